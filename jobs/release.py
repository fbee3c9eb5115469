"""Ray job entrypoint for the `release` stage.

ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/release.py --config FILE [key=value ...]
"""

from _entry import run

run("release")
