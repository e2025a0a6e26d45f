# kdctl: `make demo` runs the whole chain on built-in synthetic data; `make test` runs the test suite.
# Both create .venv and install kdctl (pinned torch/torchvision, see pyproject.toml) when needed.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
KDCTL  := $(VENV)/bin/kdctl
STAMP  := $(VENV)/.kdctl-installed

export YOLO_OFFLINE := 1
export YOLO_AUTOINSTALL := False

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[train,dev]'
	@touch $(STAMP)

install: $(STAMP)

# The baseline trains beside the teacher, its output in runs/train/quickstart-student.log: Ultralytics trains on
# cpu_count - 1 threads (one on 2 cores), so the second core would otherwise idle. Same results as one after the
# other; 8.6-9.0 minutes instead of 10.4 on 2 cores (docs/benchmarks.md, 'The demo's wall time'). --resume: a demo
# killed while training (Ctrl-C) continues those runs from their last epoch when run again, unless a recipe changed.
demo: $(STAMP)
	@mkdir -p runs/train
	@echo "baseline student: training beside the teacher, log in runs/train/quickstart-student.log"
	@$(KDCTL) train recipes/quickstart-student.yaml --out runs/train/quickstart-student --overwrite --reuse --resume \
	    > runs/train/quickstart-student.log 2>&1 & baseline=$$!; trap 'kill $$baseline 2>/dev/null' INT TERM; \
	$(KDCTL) train recipes/quickstart-teacher.yaml --out runs/train/quickstart-teacher --overwrite --reuse --resume \
	    || { kill $$baseline 2>/dev/null; wait $$baseline; exit 1; }; \
	wait $$baseline; code=$$?; tail -n 12 runs/train/quickstart-student.log; exit $$code
	$(KDCTL) distill recipes/quickstart.yaml         --out runs/distill/quickstart --overwrite
	$(KDCTL) export  runs/distill/quickstart --target cpu --out runs/export/quickstart-cpu --overwrite
	$(KDCTL) profile runs/export/quickstart-cpu --out runs/profile/quickstart-cpu --overwrite
	$(KDCTL) gate    runs/profile/quickstart-cpu --out runs/gate/quickstart-cpu --overwrite \
	                 --junit runs/gate/quickstart-cpu.junit.xml --summary runs/gate/quickstart-cpu.md
	$(KDCTL) report  runs/train/quickstart-student runs/gate/quickstart-cpu --out runs/report/quickstart --overwrite
	@$(KDCTL) bundle verify runs/train/quickstart-teacher runs/train/quickstart-student runs/distill/quickstart \
	    runs/export/quickstart-cpu runs/profile/quickstart-cpu runs/gate/quickstart-cpu runs/report/quickstart
	@echo "Report: runs/report/quickstart/report.html"

# two pytest-xdist workers (CI's 2 cores), an idle one takes the other's queued tests; the longest start first
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

bench: $(STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf runs
