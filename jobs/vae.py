"""Ray job entrypoint for the `vae` stage.

ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/vae.py --config FILE [key=value ...]
"""

from _entry import run

run("vae")
