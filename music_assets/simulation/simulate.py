"""The MUSIC simulation loop: seed contexts in, chosen and rejected continuations out.

For each context, T simulated turns follow the seed prefix. A user-simulator LLM writes each user
message from its branch's own visible history; an assistant LLM answers. Turns before the
contrast turn c are the same for both branches and generated once (branch 'shared'). At turn c the
user message is still shared, then the branches split: the chosen assistant answers it faithfully,
while the rejected assistant privately sees a *modified* version of it (an LLM rewrite that changes
one detail) and answers that. The modified request stays in the rejected assistant's view for the
rest of the conversation, so the flaw persists; the visible transcript always shows the original.

How the pieces fit: `simulate` restores each context's state from the rows committed before
(state.py), starts one flow per unfinished context (flow.py: what a context generates, turn by
turn, checked by validators.py) and lets the driver run them all against the engines' streams
(driver.py: when requests are sent, and retries). Each time the driver comes round, the finished
turns and drops the flows left in the outbox are committed to the `TurnStore`, before any request
that builds on them is sent, so a restart continues where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable

from music_assets.common.hashing import stable_hash
from music_assets.simulation.config import SimulationConfig
from music_assets.simulation.driver import Driver, Engines
from music_assets.simulation.flow import Outbox, context_flow
from music_assets.simulation.prompts import PACKAGED, Prompts
from music_assets.simulation.state import Context, ContextState, SimulationStats, TurnStore, restore


def generation_key(settings: SimulationConfig, engines: Engines, prompts: Prompts = PACKAGED) -> str:
    """Everything that determines the generated text: prompts, models, sampling, settings."""
    return stable_hash({"prompts": prompts.version, "engines": engines.identity(),
                        "settings": settings.generation_settings()})


def simulate(
    contexts: list[Context],
    engines: Engines,
    settings: SimulationConfig,
    store: TurnStore,
    log: Callable[[str], None] = print,
    prompts: Prompts = PACKAGED,
) -> SimulationStats:
    gkey = generation_key(settings, engines, prompts)
    stats = SimulationStats(contexts=len(contexts))
    states = {ctx.context_id: ContextState(ctx, settings.contrast_turn_for(ctx.context_id)) for ctx in contexts}
    restore(states, *store.load(), stats)
    outbox = Outbox(gkey)

    def commit() -> None:
        rows, drops = outbox.take()
        if not rows and not drops:
            return
        store.commit(rows, drops)
        stats.committed_rows += len(rows)
        for d in drops:
            stats.dropped[d["reason"]] += 1
        finished = sum(1 for s in states.values() if not s.dropped and s.next_turn > settings.turns)
        log(f"committed {len(rows)} turn rows, {len(drops)} drops; {finished} of {len(states)} contexts finished, "
            f"{sum(stats.dropped.values())} dropped, {stats.completion_tokens} tokens so far "
            f"({stats.tokens_per_second:.0f} tok/s)")

    flows = [context_flow(s, settings, prompts, gkey, outbox) for s in states.values()
             if not s.dropped and s.next_turn <= settings.turns]
    Driver(engines, settings.max_attempts, stats, settings.on_length, settings.max_continuations).run(flows, commit)
    stats.completed = sum(1 for s in states.values() if not s.dropped and s.next_turn > settings.turns)
    return stats
