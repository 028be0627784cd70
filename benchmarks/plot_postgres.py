"""Plot the Kafka -> PostgreSQL benchmark (bench_e2e_postgres.py --json) for docs/benchmarks.md.

PYTHONPATH=. .venv/bin/python benchmarks/bench_e2e_postgres.py --rows 1000000 --json /tmp/e2e.json
PYTHONPATH=. .venv/bin/python benchmarks/plot_postgres.py /tmp/e2e.json docs/img/postgres_e2e.png

Left: rows/s per path (median bar, one dot per round). Right: CPU microseconds per row of the
client process, PostgreSQL and the Kafka broker over the same window.
"""

from __future__ import annotations

import json
import sys

LABELS = {
    "naive": "naive\n(fastavro +\nwrite_row)",
    "copy": "kfast\ncopy",
    "copy_poisoned": "kfast copy\n0.6% bad\n+ DLQ",
    "upsert": "kfast\nupsert",
    "exactly_once": "kfast\nexactly_once",
    "copy_2conn": "kfast copy\n2 conns",
    "ceiling": "ceiling\n(pre-encoded\nCOPY)",
    "ceiling_2conn": "ceiling\n2 conns",
    "kafka_floor": "librdkafka\nalone (no\nsink)",
}
ORDER = list(LABELS)
NOT_A_LOAD = {"kafka_floor"}  # consumes and frees only: its CPU is shown, not its rate
COLORS = {
    "naive": "#999999",
    "copy": "#2b7bba",
    "copy_poisoned": "#d9822b",
    "upsert": "#6fa8dc",
    "exactly_once": "#6fa8dc",
    "copy_2conn": "#6fa8dc",
}


def main(argv: list[str]) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    src, dst = argv
    with open(src) as f:
        res = json.load(f)
    rates = res["rows_per_s"]
    n = res["rows"]
    keys = [k for k in ORDER if k in rates and k not in NOT_A_LOAD]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    bars = ax.bar(
        [LABELS[k] for k in keys],
        [rates[k] / 1000 for k in keys],
        color=[COLORS.get(k, "#cccccc") for k in keys],
    )
    q = res["ratios"]
    for i, (bar, k) in enumerate(zip(bars, keys)):
        ax.annotate(
            f"{rates[k] / 1000:,.0f}k\n{100 * q[k]['vs_ceiling']:.0f}%",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
        # each round's rate as a dot: the spread is the machine's noise
        per_round = [n / rd["seconds"][k] / 1000 for rd in res.get("per_round", [])]
        ax.plot([i] * len(per_round), per_round, "k.", markersize=4)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_ylabel("rows / s (thousands), % of the ceiling")
    g = res["goals"]
    title = (
        f"{n:,} order records Kafka -> PostgreSQL, median of {res.get('rounds', 1)} rounds\n"
        f"clean = {100 * g['clean_share_of_ceiling']:.0f}% of the ceiling (goal 70%)"
    )
    if "poisoned_vs_clean" in g:
        title += f", poisoned = {100 * g['poisoned_vs_clean']:.0f}% of clean (goal 80%)"
    ax.set_title(title, fontsize=9)

    cpu = res["cpu_us_per_row"]
    ck = [k for k in ORDER if k in cpu]
    bottom = [0.0] * len(ck)
    for part, color in (("client", "#2b7bba"), ("postgres", "#7f7f7f"), ("kafka", "#c9c9c9")):
        vals = [cpu[k].get(part, 0.0) for k in ck]
        ax2.bar([LABELS[k] for k in ck], vals, bottom=bottom, color=color, label=part)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax2.tick_params(axis="x", labelsize=7, labelrotation=45)
    ax2.set_ylabel("CPU µs per row (from /proc)")
    ax2.set_title("CPU per row: client process, PostgreSQL, Kafka broker", fontsize=9)
    ax2.legend(fontsize=8)

    env = res.get("environment", {})
    loads = ", ".join(rd.get("load_before", "?").split()[0] for rd in res.get("per_round", []))
    fig.suptitle(
        f"{env.get('cpus', '?')} CPUs ({env.get('cpu_model', '?')}), 1-min load "
        f"before each round: {loads}, Python {env.get('python', '?')}, psycopg "
        f"{env.get('psycopg', '?')}, PostgreSQL {str(env.get('postgresql', '?')).split()[0]}, "
        "Kafka 4.4.0, all on one machine",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
