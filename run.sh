#!/usr/bin/env bash
# Set-up and entry points for aejax. Safe to run again: each step is skipped when already done.
#   ./run.sh main   train the README's main job (deep autoencoder on full Fashion-MNIST)
#   ./run.sh test   run the test suite
#   ./run.sh setup  only create .venv, install aejax and the offline Fashion-MNIST files
set -euo pipefail
cd "$(dirname "$0")"
VENV="${AEJAX_VENV:-.venv}"
PY="$VENV/bin/python"

setup() {
  # Full Fashion-MNIST, offline: Debian's package ships the four IDX files (aejax.data rebuilds
  # the upstream bytes that tensorflow-datasets checks).
  if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "[aejax] installing dataset-fashion-mnist (Debian package)"
      (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null; })
    else
      echo "[aejax] warning: /usr/share/datasets/fashion-mnist is missing; run" \
           "'sudo apt-get install dataset-fashion-mnist' or pass --config.data.manual_dir=DIR" >&2
    fi
  fi
  if [ ! -x "$PY" ]; then
    echo "[aejax] creating $VENV"
    python3 -m venv "$VENV"
  fi
  # Reinstall only when pyproject.toml changed since the last install.
  stamp="$VENV/.aejax-installed"
  want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[aejax] installing aejax and its dependencies into $VENV (about a minute)"
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q -e ".[test]"
    echo "$want" > "$stamp"
  fi
}

case "${1:-}" in
  setup) setup ;;
  main)
    setup
    shift
    "$PY" -m experiments.main --config=experiments/configs/fashion_deep.py \
      --workdir="${AEJAX_WORKDIR:-runs/fashion_deep}" "$@"
    ;;
  test)
    setup
    shift
    # One pytest-xdist worker per core; a worker takes the next test when it is free.
    "$PY" -m pytest -q -n "${AEJAX_TEST_WORKERS:-auto}" --dist worksteal "$@"
    ;;
  *)
    echo "usage: ./run.sh {main|test|setup} [extra args]" >&2
    exit 2
    ;;
esac
