"""Ray job entrypoint for the `phantoms` stage.

ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/phantoms.py --config FILE [key=value ...]
"""

from _entry import run

run("phantoms")
