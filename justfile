# navi-trio tasks. `just --list` shows them.
venv := ".venv"
py := venv / "bin/python"

# create the venv and install the package with test, lint and dev extras
install:
    test -x {{py}} || python3 -m venv {{venv}}
    {{py}} -m pip install -q -e '.[test,lint,dev]'

# serve on 127.0.0.1:8000 (any flag of `navi-trio serve` can follow)
serve *ARGS: install
    {{venv}}/bin/navi-trio serve {{ARGS}}

# the test suite (the README's test command)
test *ARGS: install
    {{py}} -m pytest -q {{ARGS}}

# ruff (with the ASYNC rules), flake8-async, mypy --strict
lint: install
    {{venv}}/bin/ruff check navi_trio tests
    {{venv}}/bin/ruff format --check navi_trio tests
    {{venv}}/bin/flake8-async $(find navi_trio -name "*.py")
    {{venv}}/bin/mypy

# compare navi-trio with the seed's asyncio baseline (bench/harness/compare.py; --reps 1 for a quick look)
bench *ARGS: install
    {{py}} bench/compare.py {{ARGS}}

# scenario 4 with a "thread": true tool, interleaved with the seed (bench/stop_latency.py)
bench-stop *ARGS: install
    {{py}} bench/stop_latency.py {{ARGS}}

# server CPU per event: the seed, the stack's floor and navi-trio (bench/per_event_cpu.py)
bench-cpu *ARGS: install
    {{py}} bench/per_event_cpu.py {{ARGS}}

# 1,000 idle connections with heartbeats + 100 paced sessions for 60 s (bench/soak.py)
soak *ARGS: install
    {{py}} bench/soak.py {{ARGS}}

# cluster mode (issue #12; needs redis-server and postgresql, which .ci/setup installs):
# server CPU per event, two processes on Redis + PostgreSQL against one, interleaved (bench/cluster_cpu.py)
bench-cluster-cpu *ARGS: install
    {{py}} bench/cluster_cpu.py {{ARGS}}

# capacity in paced sessions: one process, hypercorn --workers 1 and --workers 2 (bench/cluster_capacity.py)
bench-cluster-capacity *ARGS: install
    {{py}} bench/cluster_capacity.py {{ARGS}}

# stop latency p99, asked of the run's own process against another one (bench/cluster_stop_latency.py)
bench-cluster-stop *ARGS: install
    {{py}} bench/cluster_stop_latency.py {{ARGS}}
