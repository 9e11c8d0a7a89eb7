# hemoweb: `make run` serves the app with demo data and the default models; `make test` runs the suite.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test test-sqlite test-mysql setup system venv demo clean

setup: system venv

system:
	./scripts/install-system-packages

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: this pin comes from the machine's disk and fits torchvision.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

demo: setup
	$(PY) manage.py migrate --no-input
	$(PY) manage.py setup_demo

run: demo
	$(PY) manage.py qcluster & QCLUSTER=$$!; \
	Q_CLUSTER_NAME=hemoweb-training $(PY) manage.py qcluster & TRAINING=$$!; \
	trap "kill $$QCLUSTER $$TRAINING 2>/dev/null" EXIT INT TERM; \
	$(PY) manage.py runserver $(HOST):$(PORT)

test: setup
	./scripts/start-mariadb
	./scripts/start-redis
	$(MAKE) test-sqlite test-mysql

test-sqlite:
	$(PY) -m pytest

test-mysql:
	DB=mysql DB_NAME=hemoweb DB_USER=root DB_HOST=127.0.0.1 DB_PORT=3306 $(PY) -m pytest

clean:
	rm -rf var media staticfiles test-artifacts .pytest_cache
