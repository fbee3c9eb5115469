"""Ray job entrypoint for the `pipeline` stage.

ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/pipeline.py --config FILE [key=value ...]
"""

from _entry import run

run("pipeline")
