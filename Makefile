# The two commands a newcomer needs: `make demo` and `make test`. Each builds .venv first if needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: demo demo-distributed test bench venv clean

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,bench]"
	touch $(INSTALLED)

venv: $(INSTALLED)

demo: $(INSTALLED)
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py migrate --database board --noinput
	$(BIN)/python manage.py runserver 127.0.0.1:8000

# Two workers on one PostgreSQL database and one Redis: open both pages, act on one, watch the other.
demo-distributed: $(INSTALLED)
	psql -h 127.0.0.1 -U postgres -d djstm_demo -c "SELECT 1" >/dev/null 2>&1 || createdb -h 127.0.0.1 -U postgres djstm_demo
	DJANGO_SETTINGS_MODULE=demo_site.settings_distributed $(BIN)/python manage.py migrate --noinput
	@echo "two workers: http://127.0.0.1:8001/ and http://127.0.0.1:8002/ (Ctrl-C stops both)"
	DJANGO_SETTINGS_MODULE=demo_site.settings_distributed $(BIN)/python manage.py runserver 127.0.0.1:8001 --noreload & \
	DJANGO_SETTINGS_MODULE=demo_site.settings_distributed $(BIN)/python manage.py runserver 127.0.0.1:8002 --noreload & \
	wait

test: $(INSTALLED)
	$(BIN)/python -m pytest

bench: $(INSTALLED)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) var build *.egg-info
