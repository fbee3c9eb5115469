"""Ray job entrypoint for the `reader` stage (build the blinded studies; serving runs on the study's host).

ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/reader.py --config FILE [key=value ...]
"""

from _entry import run

run("reader")
