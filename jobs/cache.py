"""Ray job entrypoint for the `cache` stage.

ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/cache.py --config FILE [key=value ...]
"""

from _entry import run

run("cache")
