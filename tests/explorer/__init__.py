"""A seeded fault explorer for ``mpsd run`` (FoundationDB's simulation, Jepsen's nemesis).

A seed picks a schedule of faults and commands (steps.py); each runs against a real ``mpsd run``
on the fakes with client load flowing (world.py), and the invariants (invariants.py) are checked
after each step and at the end (run.py). A failing schedule prints its seed, its steps and the
one line that replays it: ``python -m tests.explorer --seed 1234 --mps on --steps 8``.
"""
