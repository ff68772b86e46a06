#!/usr/bin/env python3
"""The CUDA launch rules (docs/architecture.md, "Adding an op"), checked over include/:
every __global__ kernel's first statement is pdl_begin() (launches may carry Programmatic
Dependent Launch, and that call is what waits for the previous grid), and kernels are launched
only through device::launch (no <<<...>>>, no other cudaLaunch*). Prints every violation; exits
1 if any."""
import pathlib
import re
import sys

root = pathlib.Path(__file__).resolve().parent.parent / "include"
bad, kernels = [], 0
for f in sorted(list(root.rglob("*.cuh")) + list(root.rglob("*.hpp"))):
    text = f.read_text()
    code = re.sub(r"//[^\n]*", "", text)  # comments may mention both
    for m in re.finditer(r"__global__", code):
        i, depth = m.end(), 0
        while i < len(code):  # the body's '{' at parenthesis depth 0
            c = code[i]
            depth += c == "("
            depth -= c == ")"
            if depth == 0 and c in "{;":
                break
            i += 1
        if i >= len(code) or code[i] == ";":
            continue  # a declaration
        kernels += 1
        first = code[i + 1:].lstrip()
        if not re.match(r"(::)?(ttt::cuda::device::)?pdl_begin\(\);", first):
            line = code.count("\n", 0, m.start()) + 1
            bad.append(f"{f.relative_to(root)}:{line}: a kernel whose first statement is not pdl_begin()")
    for m in re.finditer(r"<<<|cudaLaunch(Kernel|Cooperative)\w*\(", code):
        line = code.count("\n", 0, m.start()) + 1
        if "device.cuh" not in f.name:
            bad.append(f"{f.relative_to(root)}:{line}: a launch outside device::launch")
print("\n".join(bad))
print(f"kernels: {kernels} checked, " + ("all begin with pdl_begin() and launch through device::launch" if not bad
                                        else f"{len(bad)} violations above"))
sys.exit(1 if bad or kernels == 0 else 0)
