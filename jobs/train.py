"""Ray job entrypoint for the `train` stage.

ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/train.py --config FILE [key=value ...]
"""

from _entry import run

run("train")
