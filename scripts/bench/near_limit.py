"""What refuses requests near the end of a budget (issue 18): the hold's slack, and leases.

Two server processes share one database and one customer budget with room for `--room` real
requests (a short message, `max_tokens` 16, each reply using all 16: the tests' fake provider and
prices). `--clients` clients, split between the two processes, send requests until each has been
refused 3 times in a row. Printed per setting (`budget_leases` on and off): requests admitted,
what the ideal would be (every request whose real cost still fits), the budget left unspent at the
end and when the first request was refused (in real requests: the clients' holds in flight are
`--clients` × one hold), and how many refusals came while the budget still had room for every
client's hold (refused by a lease sitting on that room in the other process, not by the budget).

    .venv/bin/python scripts/bench/near_limit.py [--room 200] [--clients 8] [--delay 0]
"""

from __future__ import annotations

import argparse
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.e2e.conftest import proxy_config
from tests.e2e.enforcement_support import chat, customer_info, hold_of, post, unit_cost
from tests.fakes.upstream import run_fake_upstream
from tests.support import PostgresForTests, run_server

MAX_TOKENS = 16


def run(postgres: PostgresForTests, leases: bool, room: int, clients: int, delay_s: float) -> dict[str, object]:
    url = postgres.new_database()
    with run_fake_upstream() as upstream:
        upstream.app.reply_words, upstream.app.delay_s = MAX_TOKENS, delay_s
        config = proxy_config(upstream.base_url, f"  budget_leases: {str(leases).lower()}")
        with run_server(config, url) as first, run_server(config, url) as second:
            real, hold = unit_cost(reply_tokens=MAX_TOKENS), hold_of(max_tokens=MAX_TOKENS)
            budget = room * real
            assert post(first.base_url, "/customer/new", {"user_id": "c", "max_budget": str(budget)}).status_code == 200
            lock = threading.Lock()
            admitted, refused_with_room = 0, 0
            first_refusal: list[Decimal] = []

            def client(index: int) -> None:
                nonlocal admitted, refused_with_room
                server = first if index % 2 else second
                refusals = 0
                while refusals < 3:
                    answer = chat(server.base_url, "c", max_tokens=MAX_TOKENS)
                    with lock:
                        if answer.status_code == 200:
                            admitted += 1
                            refusals = 0
                            continue
                        refusals += 1
                    assert answer.status_code == 429, answer.text
                    spent = customer_info(first.base_url, "c")["spend"]
                    with lock:
                        first_refusal.append(spent)
                    if budget - spent >= hold * clients:  # room for every client's hold: not the budget
                        with lock:
                            refused_with_room += 1

            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(client, range(clients)))
            spend = Decimal(customer_info(first.base_url, "c")["spend"])
    postgres.drop_database(url)
    return {
        "budget_leases": leases,
        "admitted": admitted,
        "ideal": int(budget / real),
        "unspent (real requests)": float((budget - spend) / real),
        "left at the first refusal (real requests)": float((budget - min(first_refusal)) / real),
        "one hold (real requests)": float(hold / real),
        "refused with room for every client's hold": refused_with_room,
        "spend <= budget": spend <= budget,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--room", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--delay", type=float, default=0.0, help="the provider's answer time, seconds")
    args = parser.parse_args()
    postgres = PostgresForTests()
    try:
        for leases in (True, False):
            print(run(postgres, leases, args.room, args.clients, args.delay), flush=True)
    finally:
        postgres.close()


if __name__ == "__main__":
    main()
