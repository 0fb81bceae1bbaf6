# raftblock — the two commands of the README are the contract: `make demo` and `make test`.
# Both work on a fresh Debian machine with only Python 3.11 and root: they create .venv, install the
# package (building the Cython extensions) and install the Debian packages the tests need.

PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.installed
DEB_PKGS := qemu-utils libnbd-bin python3-libnbd nbdkit fuse3 fio e2fsprogs util-linux procps iproute2 nftables gcc \
            python3-venv prometheus chromium libiscsi-bin qemu-block-extra tgt
PYTEST_ARGS ?=
QUICK    ?=
SEED     ?=
REPLICATION ?=
# make demo DIR=/tmp/c2 NBD_PORT=10810 (or RAFTBLOCK_DIR / RAFTBLOCK_NBD_PORT in the environment): a second
# cluster beside the first; `raftblock cluster ... --dir` (or $RAFTBLOCK_DIR) then addresses it.
DIR      ?= $(RAFTBLOCK_DIR)
NBD_PORT ?= $(RAFTBLOCK_NBD_PORT)
ISCSI_PORT ?= $(RAFTBLOCK_ISCSI_PORT)

.PHONY: all venv sysdeps test test-fast test-slow test-iscsi lint compile bench bench-compare bench-deps bench-raft bench-rebuild bench-soak bench-snapshot bench-qos profile demo demo-down clean sim sim-chain proto faults fuzz

all: venv

# sysdeps is order-only: installed before the venv (gcc builds the Cython extensions), never a rebuild trigger.
$(STAMP): pyproject.toml setup.py $(wildcard raftblock/_fast/*.pyx) | sysdeps
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || { \
	  echo "python -m venv failed; installing Debian's python3-venv"; \
	  apt-get install -y -qq python3-venv >/dev/null && rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip setuptools wheel cython
	$(PY) -m pip install -q -e '.[test,s3,deploy]'
	touch $(STAMP)

venv: $(STAMP)

# Install only what is missing (dpkg -s first), so a machine that has everything needs no network.
sysdeps:
	@missing=""; for p in $(DEB_PKGS); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

compile: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

# The suite on the Cython hot loops, then the unit tests again on their pure-Python twins (both modes in CI;
# the integration tests that matter run both implementations in one pass, e.g. test_qemu_clients.py). The twin
# pass leaves out the tests that cannot reach raftblock/_fast (pure logic: Raft and chain cores and their
# simulations, the metadata map, lint, docs): they would run the same code twice.
NO_FAST_TESTS := lint docs imports prometheus_rules obs gateway_admin_auth sim chain_sim raft_core raft_mutations \
                 linearizability meta_state meta_group meta_journal health placement raft_repair chain_repair chain_core \
                 sessions wire chain_wire
# The Ansible deployment test (~8 min, mostly ansible-playbook waiting on its hosts: the machine is two thirds
# idle meanwhile) runs beside the rest of the suite, in its own network namespaces and pytest temp dir; its
# report follows the suite's, and either failing fails `make test`.
test: sysdeps $(STAMP)
	@tmp=$$(mktemp -d /tmp/raftblock-ansible-test.XXXXXX); \
	$(PY) -m pytest -q -p no:cacheprovider --basetemp=$$tmp/t $(PYTEST_ARGS) tests/ansible > $$tmp/log 2>&1 & apid=$$!; \
	$(PY) -m pytest -q --durations=25 $(PYTEST_ARGS) --ignore=tests/ansible tests; rc=$$?; \
	wait $$apid; arc=$$?; echo "--- tests/ansible (ran beside the suite above; exit $$arc) ---"; cat $$tmp/log; \
	rm -rf $$tmp; [ $$rc = 0 ] && [ $$arc = 0 ]
	RAFTBLOCK_NO_EXTENSIONS=1 $(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) \
	  $(foreach t,$(NO_FAST_TESTS),--ignore=tests/unit/test_$(t).py) tests/unit

# The tests marked slow, not in `make test`: variants whose path the default suite covers in its other mode, the
# libiscsi conformance suite (also `make test-iscsi`) and the rebuild-under-heartbeats soak.
test-slow: sysdeps $(STAMP)
	$(PY) -m pytest -q --durations=25 -m slow $(PYTEST_ARGS) tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -x tests/unit $(PYTEST_ARGS)

# The wheels an air-gapped rack installs from (ansible/: pip --no-index --find-links): raftblock and its runtime
# dependencies, no extras. Rebuilt only when a source changed (dist/.wheelhouse.stamp), from a copy of the sources
# (build/wheelhouse-src: the tree's in-place extensions are not shipped). The venv is made first only if missing.
WHEELHOUSE := dist/wheelhouse
WHEEL_SRCS := $(shell find raftblock -type f \( -name '*.py' -o -name '*.pyx' -o -name '*.pyi' -o -name '*.proto' \) 2>/dev/null)
dist/.wheelhouse.stamp: pyproject.toml setup.py README.md $(WHEEL_SRCS)
	rm -rf build/wheelhouse-src $(WHEELHOUSE).tmp && mkdir -p build/wheelhouse-src
	cp -r pyproject.toml setup.py README.md raftblock build/wheelhouse-src/
	find build/wheelhouse-src/raftblock \( -name '*.so' -o -name '*.c' -o -name __pycache__ \) -prune -exec rm -rf {} +
	$(PY) -m pip wheel -q --no-build-isolation -w $(WHEELHOUSE).tmp ./build/wheelhouse-src
	rm -rf $(WHEELHOUSE) build/wheelhouse-src && mv $(WHEELHOUSE).tmp $(WHEELHOUSE) && touch $@
.PHONY: wheelhouse test-ansible
wheelhouse: $(if $(wildcard $(PY)),,$(STAMP)) dist/.wheelhouse.stamp

# Only the Ansible deployment test (tests/ansible: hosts made of namespaces, as root; it runs in `make test` too).
test-ansible: sysdeps $(STAMP)
	$(PY) -m pytest -q --durations=10 $(PYTEST_ARGS) tests/ansible

# The iSCSI target alone: codec and SCSI unit tests, real initiators, libiscsi's iscsi-test-cu ALL (-d) with
# its table per suite (RAFTBLOCK_ISCSI_CU_REPORT=FILE writes it as JSON). `make test` runs them all but the
# conformance suite (2 minutes: here and in `make test-slow`).
test-iscsi: sysdeps $(STAMP)
	$(PY) -m pytest -q -s --durations=10 -m "slow or not slow" $(PYTEST_ARGS) tests/unit/test_iscsi_codec.py \
	  tests/unit/test_scsi.py tests/integration/test_iscsi.py tests/integration/test_iscsi_conformance.py

# Fuzzing (tests/fuzz/README.md): the atheris (libFuzzer) harness over every parser that reads bytes from
# outside, one target after another, FUZZ_SECONDS each (FUZZ_TARGETS=nbd,wal,... for some); the long run is
# `make fuzz FUZZ_RUNS=1000000` (a million inputs per target, no time limit). Exits non-zero on any finding
# (an undocumented exception, a hang over -timeout, an allocation over -rss_limit_mb or a tracemalloc bound);
# the input is kept under build/fuzz/artifacts/. The short Hypothesis pass over the same targets is in `make test`.
FUZZ_SECONDS ?= 30
FUZZ_RUNS    ?=
FUZZ_TARGETS ?= all
fuzz: $(STAMP)
	@$(PY) -c 'import atheris' 2>/dev/null || $(PY) -m pip install -q 'atheris>=3.0'
	nice -n 10 $(PY) tests/fuzz/atheris_run.py --target $(FUZZ_TARGETS) \
	  $(if $(FUZZ_RUNS),--runs $(FUZZ_RUNS),--seconds $(FUZZ_SECONDS))

lint: $(STAMP)
	$(PY) -m ruff check raftblock tests bench
	$(PY) -m mypy raftblock

# fio vs the 3-node cluster, raftblock serve, qemu-nbd (cache=none, writeback) and a 3-member etcd, interleaved
# rounds (bench/README.md). Installs etcd-server when missing and the [bench] extra (matplotlib) into the venv.
bench: sysdeps $(STAMP)
	@dpkg -s etcd-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq etcd-server >/dev/null; }
	@$(MAKE) --no-print-directory bench-deps
	$(PY) bench/run.py $(if $(QUICK),--quick,)

# Raft vs chain on one cluster (a raft and a chain volume) with qemu-nbd as the single-copy baseline: the same fio
# jobs (4k rand read/write QD1/QD32, 1M sequential, 70/30 mixed QD16), 3 interleaved rounds, then kill -9 of the
# Raft leader, the chain head and the chain tail under a QD8 tagged-write load (pause + lost-write verifier).
# Markdown table, JSON and PNGs under bench/results/ (bench/README.md). QUICK=1: one short round.
bench-compare: sysdeps $(STAMP)
	@$(MAKE) --no-print-directory bench-deps
	$(PY) bench/compare.py $(if $(QUICK),--quick,)

# The [bench] extra (matplotlib for the PNG, py-spy for bench/profile.py), installed once into the venv.
bench-deps: $(STAMP)
	@{ $(PY) -c 'import matplotlib' 2>/dev/null && test -x .venv/bin/py-spy; } || $(PY) -m pip install -q 'matplotlib>=3.7' 'py-spy>=0.3'

# Where a replicated write's time goes: per-process CPU per I/O and py-spy's hottest frames for one fio job.
profile: sysdeps bench-deps
	$(PY) bench/profile.py --py-spy --job $(or $(JOB),randwrite-4k-qd32)

demo: sysdeps $(STAMP)
	$(PY) -m raftblock.cli demo $(if $(REPLICATION),--replication $(REPLICATION),) $(if $(DIR),--dir $(DIR),) $(if $(NBD_PORT),--nbd-port $(NBD_PORT),) $(if $(ISCSI_PORT),--iscsi-port $(ISCSI_PORT),)

# Raft commits/s on one group and across 100 groups (3 node processes, real fdatasync) against a
# 3-member etcd in the same run (Debian's etcd-server, installed here when missing), idle CPU per node
# Kill -9 of a node holding 1 GiB of Raft replicas (4 nodes, 3 racks): detection, rebuild rate, foreground 4k write
# p99 before/during the rebuild (bench/README.md). QUICK=1: 256 MiB, one round.
bench-rebuild: sysdeps $(STAMP)
	$(PY) bench/rebuild.py $(if $(QUICK),--quick,)

# Space amplification soak: a volume overwritten 5x with mixed write sizes; disk use per node against the
# volume, and the foreground p99 while the cleaner runs (bench/soak.py; QUICK=1: 128 MiB, 3 passes).
bench-soak: sysdeps $(STAMP)
	$(PY) bench/soak.py $(if $(QUICK),--quick,)

# Snapshots and backups (bench/snapshot.py): snapshot create latency and the foreground p99 under 4k QD32
# writes with and without snapshots, export / incremental / restore MB/s against zstd-1, dedup of two clones.
bench-snapshot: sysdeps $(STAMP)
	$(PY) bench/snapshot.py $(if $(QUICK),--quick,)

# Per-volume QoS (issue 20): a quiet volume's latency beside a noisy one without and with limits, a limit held over
# 30 s, a reservation met on a saturated node; at qos_slots_ops 64 (the default) and 16 (bench/README.md). ~15 min.
bench-qos: sysdeps $(STAMP)
	$(PY) bench/qos.py $(if $(QUICK),--quick,)

bench-raft: $(STAMP)
	@dpkg -s etcd-server >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null; }
	$(PY) bench/raft_commits.py $(if $(QUICK),--rounds 1 --seconds 2 --idle-seconds 3,)

# Regenerate the protobuf module (grpc_tools.protoc needs no grpcio; --no-deps keeps the venv's protobuf)
proto: $(STAMP)
	$(PY) -m pip install -q --no-deps --target build/grpc-tools 'grpcio-tools==1.85.1'
	cd raftblock/wire && PYTHONPATH=$(CURDIR)/build/grpc-tools $(CURDIR)/$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. raftblock.proto
	sed -i '1i # ruff: noqa' raftblock/wire/raftblock_pb2.py raftblock/wire/raftblock_pb2.pyi

# Replay one simulation seed (a failing seed prints this command): make sim SEED=n [NODES=3|5] [STEPS=2000]
sim: $(STAMP)
	$(PY) -m raftblock.testing.sim --seed $(SEED) $(if $(NODES),--nodes $(NODES),) $(if $(STEPS),--steps $(STEPS),)

# Replay one seed of the chain-replication simulator (docs/chain.md, "The simulator").
sim-chain: $(STAMP)
	$(PY) -m raftblock.testing.chainsim --seed $(SEED) --steps $(or $(STEPS),2000)

# The fault campaign (docs/fault-model.md, "The fault campaign"): seeded scenarios in network namespaces, results
# appended to bench/results/faults.jsonl (seeds already there are skipped unless RERUN=1).
# make faults [SEEDS=1-54|7|3,9,12-14] [RERUN=1]
faults: sysdeps $(STAMP)
	$(PY) -m raftblock.testing.campaign --seeds $(or $(SEEDS),1-54) $(if $(RERUN),--rerun,)

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
	find raftblock -name '*.so' -delete
	find raftblock/_fast -name '*.c' -delete
