"""bench.floor: the floor is the sum of count x cost, and the commit counts are read from
PostgreSQL (a real one: they move when something commits), not written down."""

from __future__ import annotations

import psycopg

from bench import floor
from tests.conftest import Infra


def test_the_floor_is_the_sum_of_count_times_cost_and_the_ceiling_follows() -> None:
    hops = [floor.Hop("a", 1.5, 2.0), floor.Hop("c", 0.25, 12.0)]
    assert floor.floor_ms(hops) == 6.0
    assert floor.ceiling_per_s(6.0, cores=2) == 2000.0 / 6.0
    assert floor.floor_ms([floor.Hop("a", 1.5, 4.0)]) == 6.0  # the count matters, not a constant


def test_commit_counts_are_read_from_pg_stat_database(infra: Infra) -> None:
    su = infra.pg.conninfo("postgres")
    before = floor.commits(su)
    with psycopg.connect(su) as db:
        for i in range(5):
            db.execute("SELECT %s", (i,))
            db.commit()
    after = floor.commits(su)
    assert floor.delta(before, after).get("postgres", 0) >= 5
    assert floor.delta(after, after) == {}  # nothing moved: nothing counted
