# Two commands for a developer on a fresh machine (see README):
#   make demo   set up the ComfyUI test host, start a real ComfyUI server with this pack on 127.0.0.1,
#               queue a shipped example workflow on generated tiny models, save the image
#   make test   the test suite (unit, distributed, comfy tiers; the gpu tier runs on GPU machines)
PY := .host/venv/bin/python
export XDIT_REQUIRE_HOST := 1

.PHONY: host demo test test-fast clean

host:
	./tools/setup-host

demo: host
	$(PY) -m xdit_multigpu.testing.demo $(DEMO_ARGS)

test: host
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: host
	$(PY) -m pytest -q -m "unit" $(PYTEST_ARGS)

clean:
	rm -rf .host out
