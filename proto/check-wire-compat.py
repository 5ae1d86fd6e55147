#!/usr/bin/env python3
"""Check that our CRI proto is wire-identical to upstream's.

Maintenance tool, not run in CI. Run it after any change to proto/runtime/v1/api.proto:

    pip install protobuf                       # once; needs protoc on PATH as well
    cd /tmp && go mod init x && go mod download -json k8s.io/cri-api@v0.37.2   # prints "Dir"
    python3 proto/check-wire-compat.py <Dir>/pkg/apis/runtime/v1/api.proto

Optional second argument: our proto (default: runtime/v1/api.proto next to this script).

Both files are compiled with protoc into descriptor sets and compared structurally:
- messages (nested ones included, map entries included): field names, numbers, types,
  labels, type names, oneof membership, explicit packed option, map-entry flag;
- enums (nested included): value names and numbers;
- services: method names, input/output types, client/server streaming flags.
Comments, layout, declaration order and options without wire effect (go_package,
debug_redact, deprecated) are ignored. Exits 0 when identical, 1 with a list of differences.
"""

import os
import re
import subprocess
import sys
import tempfile

from google.protobuf import descriptor_pb2

FieldProto = descriptor_pb2.FieldDescriptorProto
TYPE_NAMES = {v: k for k, v in FieldProto.Type.items()}
LABEL_NAMES = {v: k for k, v in FieldProto.Label.items()}


def compile_proto(path, workdir, tag):
    """Compile one proto file into a FileDescriptorSet.

    Upstream uses `debug_redact`, which protoc < 22 rejects; it has no wire effect, so it is
    stripped from a copy before compiling.
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    text = re.sub(r"\s*\[\s*debug_redact\s*=\s*true\s*\]", "", text)
    src_dir = os.path.join(workdir, tag)
    os.makedirs(src_dir)
    with open(os.path.join(src_dir, "api.proto"), "w", encoding="utf-8") as f:
        f.write(text)
    out = os.path.join(workdir, tag + ".pb")
    subprocess.run(
        ["protoc", "-I" + src_dir, "--descriptor_set_out=" + out, "api.proto"],
        check=True,
    )
    fds = descriptor_pb2.FileDescriptorSet()
    with open(out, "rb") as f:
        fds.ParseFromString(f.read())
    if len(fds.file) != 1:
        sys.exit(f"{path}: expected one file in the descriptor set, got {len(fds.file)}")
    return fds.file[0]


def flatten(fd):
    """Map every message, enum and service to a comparable summary, keyed by full name."""
    out = {}
    pkg = "." + fd.package if fd.package else ""
    out["package"] = fd.package
    out["syntax"] = fd.syntax or "proto2"

    def enum(e, scope):
        name = f"{scope}.{e.name}"
        out["enum " + name] = sorted((v.name, v.number) for v in e.value)

    def message(m, scope):
        name = f"{scope}.{m.name}"
        fields = []
        for f in m.field:
            oneof = None
            if f.HasField("oneof_index"):
                oneof = m.oneof_decl[f.oneof_index].name
                # proto3 `optional` uses a synthetic oneof; record it distinctly.
                if f.proto3_optional:
                    oneof = "<proto3 optional>"
            fields.append(
                (
                    f.number,
                    f.name,
                    TYPE_NAMES[f.type],
                    LABEL_NAMES[f.label],
                    f.type_name,
                    oneof,
                    # An explicit [packed=...] changes how repeated scalars are encoded.
                    f.options.packed if f.options.HasField("packed") else None,
                )
            )
        out["message " + name] = {
            "fields": sorted(fields),
            "map_entry": m.options.map_entry,
            "oneofs": sorted(o.name for o in m.oneof_decl),
        }
        for e in m.enum_type:
            enum(e, name)
        for n in m.nested_type:
            message(n, name)

    for e in fd.enum_type:
        enum(e, pkg)
    for m in fd.message_type:
        message(m, pkg)
    for s in fd.service:
        out[f"service {pkg}.{s.name}"] = sorted(
            (
                mm.name,
                mm.input_type,
                mm.output_type,
                mm.client_streaming,
                mm.server_streaming,
            )
            for mm in s.method
        )
    return out


def diff_lists(key, ref, ours, problems):
    ref_set, our_set = set(ref), set(ours)
    for item in sorted(ref_set - our_set, key=repr):
        problems.append(f"{key}: missing {item}")
    for item in sorted(our_set - ref_set, key=repr):
        problems.append(f"{key}: extra {item}")


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    ref_path = sys.argv[1]
    ours_path = (
        sys.argv[2]
        if len(sys.argv) == 3
        else os.path.join(os.path.dirname(os.path.abspath(__file__)), "runtime/v1/api.proto")
    )
    with tempfile.TemporaryDirectory() as tmp:
        ref = flatten(compile_proto(ref_path, tmp, "reference"))
        ours = flatten(compile_proto(ours_path, tmp, "ours"))

    problems = []
    for key in sorted(set(ref) | set(ours)):
        if key not in ours:
            problems.append(f"missing: {key}")
        elif key not in ref:
            problems.append(f"extra: {key}")
        elif ref[key] != ours[key]:
            a, b = ref[key], ours[key]
            if isinstance(a, dict):
                diff_lists(key + " fields", a["fields"], b["fields"], problems)
                if a["map_entry"] != b["map_entry"]:
                    problems.append(f"{key}: map_entry {a['map_entry']} != {b['map_entry']}")
                if a["oneofs"] != b["oneofs"]:
                    problems.append(f"{key}: oneofs {a['oneofs']} != {b['oneofs']}")
            elif isinstance(a, list):
                diff_lists(key, a, b, problems)
            else:
                problems.append(f"{key}: {a!r} != {b!r}")

    def count(prefix, summary):
        return sum(1 for k in summary if k.startswith(prefix))

    messages = [k for k, v in ours.items() if k.startswith("message ") and not v["map_entry"]]
    map_entries = count("message ", ours) - len(messages)
    rpcs = sum(len(v) for k, v in ours.items() if k.startswith("service "))
    print(
        f"ours: {len(messages)} messages (+{map_entries} map entries), "
        f"{count('enum ', ours)} enums, {count('service ', ours)} services, {rpcs} RPCs"
    )
    if problems:
        print(f"{len(problems)} difference(s) from {ref_path}:")
        for p in problems:
            print("  " + p)
        sys.exit(1)
    print(f"wire-identical to {ref_path}")


if __name__ == "__main__":
    main()
