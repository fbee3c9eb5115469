"""Ray job entrypoint for the `generate` stage.

ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/generate.py --config FILE [key=value ...]
"""

from _entry import run

run("generate")
