"""`align merge` and `align export`: an entry as full weights, a Hugging Face folder or a GGUF file."""

from __future__ import annotations

from align.cli.common import registry_of


def cmd_merge(args) -> int:
    from align.export.merge import merge
    from align.export.parity import describe

    entry = merge(args.ref, registry_of(args), args.dtype, args.name)
    print(f"{entry.ref}  ({entry.path})")
    print(f"    merged from {entry.manifest['merge']['from']} in {args.dtype}: "
          f"{describe(entry.manifest['merge']['parity_vs_adapter'])} vs the unmerged adapter")
    return 0


def cmd_export(args) -> int:
    from align.export import export_model
    from align.export.command import human_size
    from align.export.parity import describe

    report = export_model(args.ref, registry_of(args), args.format, args.dtype, args.out, force=args.force)
    print(f"{report['path']}  ({report['format']} {report['dtype']}, {human_size(report['total_bytes'])})")
    for file, size in report["files"].items():
        print(f"    {file}: {human_size(size)}")
    if report["merge"]:
        print(f"    merge vs unmerged adapter: {describe(report['merge']['parity_vs_adapter'])}")
    checks = report["verification"]
    print(f"    reloaded vs {report['reference']}: {describe(checks['parity'])}")
    print(f"    tokenizer: same ids on {checks['tokenizer']['samples']} samples, same chat template")
    if "generation" in checks:
        gen = checks["generation"]
        print(f"    generation ({'stopped at EOS' if gen['stopped_at_eos'] else 'hit max_new_tokens'}): "
              f"{gen['prompt']!r} -> {gen['text']!r}")
    return 0


def cmd_check_export(args) -> int:
    """0 when every dtype's GGUF file passes in llama.cpp, else 1; the table either way."""
    from pathlib import Path

    from align.export.command import slug
    from align.export.llama_cpp import check_export, table

    registry = registry_of(args)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    out = Path(args.out) if args.out else Path("exports") / f"{slug(args.ref)}-llama-cpp-check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results = check_export(args.ref, registry, dtypes, out, args.max_new_tokens)
    print(table(results))
    for r in results:
        for row in r["rows"]:
            if not row["greedy_match"]:
                print(f"    {r['dtype']} {row['prompt']!r}: transformers {row['hf_answer']!r} / llama.cpp "
                      f"{row['llama_cpp_answer']!r}")
    print(f"figures: {out}")
    return 0 if all(r["passed"] for r in results) else 1


def add_check_export(sub) -> None:
    """`align check-export`'s arguments."""
    p = sub.add_parser("check-export", help="export REF to GGUF and run each file in llama.cpp against the fp32 "
                       "model (needs llama-cpp-python)")
    p.add_argument("ref", help="registry ref (adapters are merged first), local folder or hub id")
    p.add_argument("--dtypes", default="f16,q8_0", help="GGUF dtypes to check (default f16,q8_0)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy answer length compared (default 32)")
    p.add_argument("--out", help="where the figures go (default exports/<ref>-llama-cpp-check.json)")
    p.set_defaults(fn=cmd_check_export)


def add_merge(sub) -> None:
    """`align merge`'s arguments."""
    p = sub.add_parser("merge", help="merge a LoRA adapter entry into full weights and register the result")
    p.add_argument("ref", help="adapter entry (policy or reward), e.g. quickstart/sft@2")
    p.add_argument("--dtype", default="fp32", help="fp32 (default), bf16 or fp16; quantized types are refused")
    p.add_argument("--name", help="entry name for the result (default: REF's name + '-merged')")
    p.set_defaults(fn=cmd_merge)


def add_export(sub) -> None:
    """`align export`'s arguments."""
    p = sub.add_parser("export", help="export an entry as a Hugging Face directory or a GGUF file, verified")
    p.add_argument("ref", help="registry ref (adapters are merged first), local folder, GGUF file or hub id")
    p.add_argument("--format", required=True, choices=["hf", "gguf"])
    p.add_argument("--dtype", help="hf: fp32 (default), bf16, fp16; gguf: f16 (default), f32, bf16, q8_0")
    p.add_argument("--out", help="output folder (default: exports/<ref>-<format>-<dtype>)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(fn=cmd_export)
