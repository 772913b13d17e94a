# Sourced by the benchmark scripts: sets PY to the interpreter to run them with. PYTHON when set, else `python` of
# an active virtual environment, else .venv/bin/python of the repository (run from its root), else python3.
if [[ -n "${PYTHON:-}" ]]; then
    PY=$PYTHON
elif [[ -n "${VIRTUAL_ENV:-}" ]] && command -v python >/dev/null; then
    PY=python
elif [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=python3
fi
