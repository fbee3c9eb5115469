"""Ray job entrypoint for the `ingest` stage.

ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/ingest.py --config FILE [key=value ...]
"""

from _entry import run

run("ingest")
