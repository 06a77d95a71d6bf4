# Sourced by the GPU scripts: install the wheels carried in .whl/ (the device image lacks hydra-core, omegaconf,
# ...; notes/gpu.md says how to fetch them) into /tmp/site, put them and this checkout on PYTHONPATH, and check
# that the modules named in $1 import. Needs PY.
need=${1:-hydra omegaconf}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
$PY -c "import ${need// /, }" || { echo "missing one of: $need (carry their wheels in .whl/)" >&2; exit 2; }
