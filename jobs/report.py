"""Ray job entrypoint for the `report` stage.

ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/report.py --config FILE [key=value ...]
"""

from _entry import run

run("report")
