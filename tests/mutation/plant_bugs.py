"""Plant each bug of issue 14 §6 in methods/, run the formula tests, record which tests fail, restore the file.

Not collected by pytest and not part of CI (one to ten minutes on two cores, with the machine's load):
    OMP_NUM_THREADS=1 .venv/bin/python tests/mutation/plant_bugs.py [--tests tests/test_methods_formulas.py]
Prints a Markdown table (the one in tests/README.md). Every file is restored byte for byte, also on Ctrl-C.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# (id, file, exact text, replacement, what the bug is); each text must occur exactly once in its file
PLANTS = [
    ("scale-x2-adapter", "methods/_adapter.py", "        return alpha / rank\n", "        return 2 * alpha / rank\n",
     "s = 2α/r for every alpha_over_r method, consistently in forward and merge"),
    ("scale-x2-lora", "methods/lora.py", "        s = c.scaling_value\n",
     "        s = 2 * c.scaling_value\n", "LoRA: doubled s in forward and merge"),
    ("scale-x2-lors", "methods/_lors.py", "        s = c.scaling_value\n",
     "        s = 2 * c.scaling_value\n",
     "LoRS/lors_exact: doubled s in forward, gradient and merge"),
    ("exact-falls-back", "methods/lors_exact.py", "    exact = True\n", "    exact = False\n",
     "lors_exact returns the faithful mask-free adapter gradient"),
    ("grad-scale-ignored", "methods/_lors.py", "        self.grad_scale = float(grad_scale)\n",
     "        self.grad_scale = 1.0\n", "grad_scale=s ignored at the module level"),
    ("dropout-removed-lora", "methods/lora.py", "nn.Dropout(dropout) if dropout > 0 else nn.Identity()",
     "nn.Identity()", "LoRA adapter dropout removed"),
    ("dropout-on-base-lora", "methods/lora.py", "        base = F.linear(x, self.weight, self.bias)\n",
     "        base = F.linear(self.dropout(x), self.weight, self.bias)\n", "LoRA dropout also on the base branch"),
    ("dropout-removed-sqft", "methods/sqft.py", "nn.Dropout(dropout) if dropout > 0 else nn.Identity()",
     "nn.Identity()", "SQFT adapter dropout removed"),
    ("dropout-on-base-sqft", "methods/sqft.py",
     "        return F.linear(x, self.weight, self.bias) + F.linear(self.dropout(x), delta)\n",
     "        x = self.dropout(x)\n        return F.linear(x, self.weight, self.bias) + F.linear(x, delta)\n",
     "SQFT dropout applied to the input of both branches"),
    ("dropout-removed-spp", "methods/spp.py", "nn.Dropout(dropout) if dropout > 0 else nn.Identity()",
     "nn.Identity()", "SPP adapter dropout removed"),
    ("dropout-on-base-spp", "methods/spp.py",
     "        base = F.linear(x, self.weight, self.bias)\n        xd = self.dropout(x)\n",
     "        xd = self.dropout(x)\n        base = F.linear(xd, self.weight, self.bias)\n",
     "SPP dropout applied to the base branch too (same mask)"),
    ("dropout-removed-slope", "methods/slope.py", "nn.Dropout(dropout) if dropout > 0 else nn.Identity()",
     "nn.Identity()", "SLoPe adapter dropout removed"),
    ("svd-rotated-1e-3", "methods/_lors.py", "    return Q[:, :rank].t().contiguous() / gamma\n",
     ("    angle = torch.tensor(1e-3, dtype=Q.dtype)\n"
      "    Q_r = Q[:, :rank].clone()\n"
      "    Q_r[:, 0] = torch.cos(angle) * Q[:, 0] + torch.sin(angle) * Q[:, rank]\n"
      "    return Q_r.t().contiguous() / gamma\n"),
     "gradient-SVD init: first vector rotated 1e-3 rad towards singular vector r+1"),
]


def run_tests(tests: list[str]) -> tuple[int, list[str]]:
    proc = subprocess.run([sys.executable, "-m", "pytest", *tests, "-q", "-p", "no:cacheprovider", "-rf",
                           "--no-header"], check=False, cwd=REPO, capture_output=True, text=True)
    failed = re.findall(r"^FAILED (\S+)", proc.stdout, flags=re.MULTILINE)
    return proc.returncode, failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", nargs="+", default=["tests/test_methods_formulas.py"])
    parser.add_argument("--only", nargs="*", default=None, help="plant ids to run (default: all)")
    args = parser.parse_args()
    code, failed = run_tests(args.tests)
    if code != 0:
        print(f"the tests fail before planting anything: {failed}", file=sys.stderr)
        return 2
    rows = []
    for plant_id, rel, old, new, what in PLANTS:
        if args.only and plant_id not in args.only:
            continue
        path = REPO / rel
        original = path.read_bytes()
        text = original.decode()
        if text.count(old) != 1:
            print(f"{plant_id}: the text to replace occurs {text.count(old)} times in {rel}", file=sys.stderr)
            return 2
        try:
            path.write_text(text.replace(old, new))
            code, failed = run_tests(args.tests)
        finally:
            path.write_bytes(original)
        caught = ", ".join(sorted(f.split("::", 1)[1] for f in failed)) if failed else "NOT CAUGHT"
        rows.append(f"| `{plant_id}` | {what} | {len(failed)} | {caught} |")
        print(rows[-1], flush=True)
    print("\n| plant | bug | failing tests | which |\n|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
