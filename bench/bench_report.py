"""Statistics, targets, the markdown table and the plot for bench/mount_latency.py results."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

FLOOR = "floor"
NBDFUSE_CHAIN = "qemu-nbd+nbdfuse+loop"
API_QCOW2 = "gateway bind qcow2 (api)"


def pct(values: list[float], q: float) -> float:
    """Percentile with linear interpolation (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return pct(values, 50)


def ms(values: list[float]) -> str:
    return f"{median(values) * 1000:7.1f} ms"


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": median(values), "p95": pct(values, 95),
            "max": max(values) if values else math.nan}


def _target(name: str, value: float, limit: float, better: str, detail: str) -> dict[str, Any]:
    if math.isnan(value):
        status = "skipped"
    elif better == "lower":
        status = "met" if value <= limit else "missed"
    else:
        status = "met" if value >= limit else "missed"
    return {"name": name, "status": status, "value": round(value, 3), "limit": limit,
            "detail": detail}


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    paths = r.get("latency", {}).get("paths", {})
    if API_QCOW2 in paths and FLOOR in paths:
        for kind in ("cold", "warm"):
            gw = median(paths[API_QCOW2][kind])
            fl = median(paths[FLOOR][kind])
            out.append(_target(f"qcow2 bind API p50 <= 1.5x floor ({kind})", gw / fl, 1.5,
                               "lower", f"{gw * 1e3:.1f} ms vs floor {fl * 1e3:.1f} ms = "
                               f"{gw / fl:.2f}x"))
            if NBDFUSE_CHAIN in paths:
                ch = median(paths[NBDFUSE_CHAIN][kind])
                out.append(_target(f"qcow2 bind API >= 2x faster than qemu-nbd+nbdfuse ({kind})",
                                   ch / gw, 2.0, "higher", f"{ch * 1e3:.1f} ms / {gw * 1e3:.1f} "
                                   f"ms = {ch / gw:.2f}x faster"))
    walls = r.get("concurrency", {}).get("wall", {})
    if "1" in walls and walls:
        top = max(walls, key=int)
        one, many = median(walls["1"]), median(walls[top])
        out.append(_target(f"{top} concurrent mounts <= 4x one mount", many / one, 4.0, "lower",
                           f"{many * 1e3:.1f} ms vs {one * 1e3:.1f} ms = {many / one:.2f}x"))
    ct = r.get("container")
    if ct is not None:
        if "skipped" in ct:
            out.append({"name": "container start on gateway <= 1.1x plain dir",
                        "status": "skipped", "detail": ct["skipped"]})
        else:
            plain = median(ct["start"]["plain dir"])
            for label in ("gateway (domain-start incl. mount)", "gateway (premounted)"):
                gw = median(ct["start"][label])
                out.append(_target(f"container start, {label} <= 1.1x plain dir", gw / plain,
                                   1.1, "lower", f"{gw * 1e3:.1f} ms vs {plain * 1e3:.1f} ms = "
                                   f"{gw / plain:.2f}x"))
    if r.get("cli_overhead"):
        out += _cli_targets(r["cli_overhead"])
    if r.get("fio"):
        out += _fio_targets(r["fio"])
    tp = r.get("throughput", {}).get("files")
    if tp:
        bv, nf = tp["block view"], tp["nbdfuse"]
        for key, unit in (("seq_mib_s", "MiB/s"), ("rand4k_iops", "IOPS")):
            a, b = median(bv[key]), median(nf[key])
            out.append(_target(f"block-view {key.split('_')[0]} reads >= 0.8x nbdfuse", a / b,
                               0.8, "higher", f"{a:.0f} vs {b:.0f} {unit} = {a / b:.2f}x"))
    return out


CLI_OVERHEAD_LIMIT = 0.015  # seconds: gatewayctl's own cost per call (issue 20)
CLI_TARGET_COMMANDS = ("status", "mount (warm, bind)")


def cli_overheads(c: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per command: CLI and API p50/p90 and the overhead (CLI minus API) at each, in seconds."""
    out: dict[str, dict[str, float]] = {}
    for label, d in c["commands"].items():
        row = {}
        for q in (50, 90):
            row[f"cli_p{q}"] = pct(d["cli"], q)
            row[f"api_p{q}"] = pct(d["api"], q)
            row[f"overhead_p{q}"] = row[f"cli_p{q}"] - row[f"api_p{q}"]
        out[label] = row
    return out


def cli_markdown(c: dict[str, Any]) -> str:
    rows = cli_overheads(c)
    lines = [f"gatewayctl overhead against a real gatewayd, {c['runs']} runs each, CLI and "
             "in-process client interleaved; overhead = CLI minus API at the same percentile.",
             "", "| command | CLI p50 ms | CLI p90 | API p50 ms | overhead p50 ms | "
             "overhead p90 ms |", "|---|---:|---:|---:|---:|---:|"]
    for label, row in rows.items():
        lines.append(f"| `{label}` | {_f(row['cli_p50'])} | {_f(row['cli_p90'])} | "
                     f"{_f(row['api_p50'])} | {_f(row['overhead_p50'])} | "
                     f"{_f(row['overhead_p90'])} |")
    for label, vals in c.get("interpreter", {}).items():
        lines.append(f"| `{label}` (context) | {_f(median(vals))} | {_f(pct(vals, 90))} | - | "
                     "- | - |")
    return "\n".join([*lines, ""])


def _cli_targets(c: dict[str, Any]) -> list[dict[str, Any]]:
    rows = cli_overheads(c)
    return [_target(f"gatewayctl overhead p50 <= 15 ms ({label})", rows[label]["overhead_p50"],
                    CLI_OVERHEAD_LIMIT, "lower",
                    f"{rows[label]['cli_p50'] * 1e3:.1f} ms CLI - "
                    f"{rows[label]['api_p50'] * 1e3:.1f} ms API = "
                    f"{rows[label]['overhead_p50'] * 1e3:.1f} ms")
            for label in CLI_TARGET_COMMANDS if label in rows]


FIO_LIMITS = {"iops": 0.9, "mib_s": 1.0}  # block view / nbdfuse aims (issue 20)


def fio_markdown(f: dict[str, Any]) -> str:
    io = ", ".join(f"{k}: {'O_DIRECT' if v else 'buffered'}" for k, v in f["direct"].items())
    lines = [f"fio on one {f['size'] >> 20} MiB qcow2 export (random data), {f['engine']}, "
             f"{f['runtime']:g} s per job ({io}); ratio = block view / nbdfuse.", "",
             "| workload | iodepth | block view | nbdfuse | unit | ratio |",
             "|---|---:|---:|---:|---|---:|"]
    for row in f["rows"]:
        unit = "IOPS" if row["figure"] == "iops" else "MiB/s"
        lines.append(f"| {row['workload']} | {row['depth']} | {row['block view']:.0f} | "
                     f"{row['nbdfuse']:.0f} | {unit} | {row['ratio']:.2f}x |")
    return "\n".join([*lines, ""])


def _fio_targets(f: dict[str, Any]) -> list[dict[str, Any]]:
    unit = {"iops": "IOPS", "mib_s": "MiB/s"}
    return [_target(f"block view {row['workload']} qd{row['depth']} >= "
                    f"{FIO_LIMITS[row['figure']]}x nbdfuse", row["ratio"],
                    FIO_LIMITS[row["figure"]], "higher",
                    f"{row['block view']:.0f} vs {row['nbdfuse']:.0f} {unit[row['figure']]} = "
                    f"{row['ratio']:.2f}x") for row in f["rows"]]


def _f(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.1f}"


def markdown(r: dict[str, Any]) -> str:
    h = r.get("host", {})
    lines = [f"Mount latency (`make bench`, {h.get('date', '?')}, kernel {h.get('kernel', '?')}, "
             f"{h.get('cpus', '?')} CPUs, {h.get('qemu', '?')}, rev {h.get('git_rev', '?')[:12]})"
             f"{' SMOKE' if r.get('smoke') else ''}", ""]
    lat = r.get("latency")
    if lat:
        paths = lat["paths"]
        floor = paths.get(FLOOR)
        lines += [f"Time to a mounted rootfs showing /etc/marker, {lat['iterations']} iterations "
                  "each; cold = first mount after registration with the page cache dropped, "
                  "warm = remount. Ratio = p50 / floor p50.", "",
                  "| path | cold p50 ms | cold p95 | cold max | cold x floor | warm p50 ms | "
                  "warm p95 | warm max | warm x floor |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, d in paths.items():
            cells = [name]
            for kind in ("cold", "warm"):
                s = summary(d[kind])
                ratio = (s["p50"] / median(floor[kind])) if floor else math.nan
                cells += [_f(s["p50"]), _f(s["p95"]), _f(s["max"]),
                          "-" if math.isnan(ratio) else f"{ratio:.2f}x"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for name, d in paths.items():
            if d.get("failures"):
                lines += [f"{name}: {len(d['failures'])} failed iteration(s), not timed: "
                          f"{d['failures'][0]}", ""]
    conc = r.get("concurrency")
    if conc:
        walls = conc["wall"]
        floor = conc.get("floor_syscalls_wall", {})
        one = median(walls["1"]) if "1" in walls else math.nan
        floor_one = median(floor["1"]) if "1" in floor else math.nan
        lines += ["Concurrent mounts (bind, qcow2, API): wall time until all are mounted, p50 of "
                  f"{conc['reps']}. For context, the kernel floor (floor-syscalls: loop ioctl + "
                  "mount(2) of raw copies, one thread each) at the same levels.", "",
                  "| volumes | wall p50 ms | x one mount | floor-syscalls p50 ms | x its one |",
                  "|---:|---:|---:|---:|---:|"]
        for level, vals in walls.items():
            fl = median(floor[level]) if level in floor else math.nan
            lines.append(f"| {level} | {_f(median(vals))} | {median(vals) / one:.2f}x | "
                         f"{_f(fl)} | {fl / floor_one:.2f}x |")
        lines.append("")
    size = r.get("size")
    if size:
        lines += ["Image size (sparse ext4, bind, qcow2, API), p50 of "
                  f"{size['reps']}.", "", "| size | cold p50 ms | warm p50 ms |",
                  "|---:|---:|---:|"]
        for sz, d in size["sizes"].items():
            mib = int(sz) // (1 << 20)
            label = f"{mib // 1024} GiB" if mib >= 1024 else f"{mib} MiB"
            lines.append(f"| {label} | {_f(median(d['cold']))} | {_f(median(d['warm']))} |")
        lines.append("")
    ct = r.get("container")
    if ct:
        if "skipped" in ct:
            lines += [f"Container start: skipped ({ct['skipped']}).", ""]
        else:
            plain = median(ct["start"]["plain dir"])
            lines += [f"Container start (libvirt-lxc, until init runs), {ct['reps']} each.", "",
                      "| rootfs | p50 ms | p95 ms | x plain dir |", "|---|---:|---:|---:|"]
            for label, vals in ct["start"].items():
                s = summary(vals)
                lines.append(f"| {label} | {_f(s['p50'])} | {_f(s['p95'])} | "
                             f"{s['p50'] / plain:.2f}x |")
            lines.append("")
    tp = r.get("throughput")
    if tp:
        lines += [f"Reads of a {tp['size'] >> 20} MiB qcow2 export (same QSD export), p50 of "
                  f"{tp['reps']}, caches dropped.", "",
                  "| reader | seq MiB/s (1 MiB) | 4K random IOPS | I/O |", "|---|---:|---:|---|"]
        for label, d in tp["files"].items():
            lines.append(f"| {label} | {median(d['seq_mib_s']):.0f} | "
                         f"{median(d['rand4k_iops']):.0f} | {d['io']} |")
        lines.append("")
    if r.get("fio"):
        lines.append(fio_markdown(r["fio"]))
    if r.get("cli_overhead"):
        lines.append(cli_markdown(r["cli_overhead"]))
    tg = r.get("targets")
    if tg:
        lines += ["| target | result | figures |", "|---|---|---|"]
        lines += [f"| {t['name']} | {t['status']} | {t['detail']} |" for t in tg]
        lines.append("")
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0][0]
    paths = r.get("latency", {}).get("paths", {})
    names = list(paths)
    for i, kind in enumerate(("cold", "warm")):
        vals = [median(paths[n][kind]) * 1000 for n in names]
        errs = [pct(paths[n][kind], 95) * 1000 - v for n, v in zip(names, vals, strict=True)]
        ax.barh([y + i * 0.4 for y in range(len(names))], vals, 0.4, xerr=errs, label=kind)
    ax.set_yticks([y + 0.2 for y in range(len(names))], names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms to mounted rootfs (p50, bar to p95)")
    ax.set_title("mount latency")
    ax.legend()
    ax = axes[0][1]
    walls = r.get("concurrency", {}).get("wall", {})
    if walls:
        xs: list[float] = [int(k) for k in walls]
        ax.plot(xs, [median(v) * 1000 for v in walls.values()], "o-", label="gateway")
        floor = r["concurrency"].get("floor_syscalls_wall", {})
        if floor:
            ax.plot([int(k) for k in floor], [median(v) * 1000 for v in floor.values()], "s:",
                    label="floor-syscalls")
        one = median(walls.get("1", [math.nan])) * 1000
        ax.plot(xs, [4 * one] * len(xs), "--", label="target: 4x one mount")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("volumes mounted at once")
        ax.set_ylabel("wall ms until all mounted")
        ax.set_title("concurrency")
        ax.legend()
    ax = axes[1][0]
    sizes = r.get("size", {}).get("sizes", {})
    if sizes:
        xs = [int(k) / (1 << 20) for k in sizes]  # MiB
        for kind in ("cold", "warm"):
            ax.plot(xs, [median(d[kind]) * 1000 for d in sizes.values()], "o-", label=kind)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("image size (MiB)")
        ax.set_ylabel("mount ms (p50)")
        ax.set_title("image size (bind qcow2)")
        ax.legend()
    ax = axes[1][1]
    tp = r.get("throughput", {}).get("files", {})
    ct = r.get("container", {}).get("start", {})
    if tp:
        labels = list(tp)
        seq = [median(tp[k]["seq_mib_s"]) for k in labels]
        iops = [median(tp[k]["rand4k_iops"]) for k in labels]
        ax.bar([0, 1], seq, 0.6, tick_label=labels)
        ax.set_ylabel("sequential MiB/s")
        ax2 = ax.twinx()
        ax2.plot([0, 1], iops, "ro", label="4K random IOPS")
        ax2.set_ylabel("4K random IOPS")
        ax2.legend(loc="upper right")
        title = "block-view reads"
        if ct:
            title += " | container start p50: " + ", ".join(
                f"{k.split(' (')[0] if 'plain' in k else k}: {median(v) * 1000:.0f} ms"
                for k, v in ct.items())
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
