"""A cell's neighbourhood: who its neighbours are, where it sits, how alive each one is.

Sans-IO: every method takes the time it needs and returns the messages the
cell should send (hellos, heartbeats) instead of sending them.

Rules kept here:

* The neighbours and clients come only from the cell's own database; the
  transport's keyring is built from the same read (`apply` returns it).
* A cell learns its full path from its parent's hello or heartbeat, and only
  when the parent's account is consistent (its path ends with its own name,
  and names this cell under it). Learning a path re-tells the children.
* A parent whose path holds this cell's own name is a cycle in the registry
  (api -> c1 -> g1 -> api): its hello is refused, logged once as an error and
  kept in `problems` for the status view, so paths never grow without end.
  So is a path whose depth would pass the hop limit.
* Liveness moves on hearing any message and on each heartbeat tick.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from zcells import logs, routing
from zcells.liveness import Liveness, Tracker
from zcells.messages import Heartbeat, Hello, new_message_id
from zcells.names import PATH_SEPARATOR, child_path, last_name
from zcells.peer import Peer, Role
from zcells.records import Client, Neighbour
from zcells.transport import ParentLink, Topology

log = logs.get_logger("node")

Outgoing = list[tuple[Peer, Hello | Heartbeat]]


class Neighbourhood:
    def __init__(
        self,
        name: str,
        cell_type: str,
        *,
        max_hop_count: int,
        heartbeat_interval_s: float,
        mute_after_s: float,
    ) -> None:
        self.name = name
        self.cell_type = cell_type
        self.heartbeat_interval_s = heartbeat_interval_s
        self.mute_after_s = mute_after_s
        self.view = routing.View(name, max_hop_count=max_hop_count)
        self.clients: dict[str, Client] = {}
        self.disabled: frozenset[str] = frozenset()  # children the cell scheduler skips
        self.weights: dict[str, tuple[float, float]] = {}  # child -> (weight offset, scale)
        self.trackers: dict[Peer, Tracker] = {}
        self.problems: dict[str, str] = {}  # parent name -> why its hello is refused
        self.parent_names: frozenset[str] = frozenset()  # parents in the cells table

    # -- the registry -------------------------------------------------------------------

    def apply(self, neighbours: list[Neighbour], clients: list[Client], now: float) -> Topology:
        """Take a fresh read of the cells and clients tables; returns the transport's keyring."""
        self.clients = {c.name: c for c in clients}
        parents = {n.name: n for n in neighbours if n.kind == "parent"}
        if len(parents) > 1:  # `cell add` refuses this; a table edited by hand may hold it
            first, *others = sorted(parents)
            for name in others:
                why = f"a second parent: a cell has one, {first}; {name} is not dialled"
                if self.problems.get(name) != why:
                    logs.event(log, logging.ERROR, "registry.second_parent", parent=name)
                self.problems[name] = why
            parents = {first: parents[first]}
        children = {n.name: n for n in neighbours if n.kind == "child"}
        self.disabled = frozenset(n for n, c in children.items() if c.disabled)
        self.weights = {n: (c.weight_offset, c.weight_scale) for n, c in children.items()}
        self.parent_names = frozenset(parents)
        registered = {n.name for n in neighbours if n.kind == "parent"}
        self.problems = {n: why for n, why in self.problems.items() if n in registered}
        # A parent whose hello was refused is no parent in the view: this cell goes on
        # as if it were not registered (a top cell stays the top), until it is fixed.
        known = {n: self.view.parents.get(n) for n in parents if n not in self.problems}
        self.view = replace(self.view, parents=known, children=frozenset(children))
        wanted = {Peer(Role.PARENT, n) for n in parents} | {Peer(Role.CHILD, n) for n in children}
        for peer in wanted - self.trackers.keys():
            self.trackers[peer] = Tracker(
                late_after_s=3 * self.heartbeat_interval_s,
                mute_after_s=self.mute_after_s,
                since=now,
            )
        for peer in self.trackers.keys() - wanted:
            del self.trackers[peer]
        return Topology(
            parents={n: ParentLink(p.endpoint, p.public_key) for n, p in parents.items()},
            children={n: c.public_key for n, c in children.items()},
            clients={c.name: c.public_key for c in clients},
        )

    # -- where this cell sits -------------------------------------------------------------

    @property
    def known_path(self) -> str | None:
        paths = self.view.paths
        return paths[0] if paths else None

    @property
    def here(self) -> str:
        """This cell's full path, or its name until a parent has placed it."""
        return self.known_path or self.name

    def hello_for(self, peer: Peer, wall: float) -> Hello:
        here = self.known_path
        your = child_path(here, peer.name) if here and peer.role is Role.CHILD else None
        return Hello(
            id=new_message_id(), sent_at=wall, cell_type=self.cell_type, path=here, your_path=your
        )

    def on_hello(self, peer: Peer, hello: Hello, wall: float) -> Outgoing:
        """A parent's hello places this cell; a child's or client's is answered with ours."""
        if peer.role is Role.PARENT:
            return self.learn(peer, hello.path, hello.your_path, wall)
        return [(peer, self.hello_for(peer, wall))]

    def learn(self, peer: Peer, path: str | None, your_path: str | None, wall: float) -> Outgoing:
        """A parent says where it sits; that fixes where this cell sits under it."""
        if peer.role is not Role.PARENT or path is None or peer.name not in self.parent_names:
            return []
        if your_path != child_path(path, self.name) or last_name(path) != peer.name:
            logs.event(
                log,
                logging.WARNING,
                "hello.inconsistent",
                peer=peer,
                path=path,
                your_path=your_path,
            )
            return []
        refused = self._refusal(path)
        if refused is not None:
            if self.problems.get(peer.name) != refused:
                self.problems[peer.name] = refused
                logs.event(log, logging.ERROR, "hello.refused", peer=peer, reason=refused)
                parents = {n: p for n, p in self.view.parents.items() if n != peer.name}
                self.view = replace(self.view, parents=parents)
            return []
        self.problems.pop(peer.name, None)
        if self.view.parents.get(peer.name) == path:
            return []
        self.view = replace(self.view, parents={**self.view.parents, peer.name: path})
        logs.event(log, logging.INFO, "cell.placed", cell=self.name, path=your_path, parent=peer)
        children = (Peer(Role.CHILD, child) for child in sorted(self.view.children))
        return [(child, self.hello_for(child, wall)) for child in children]

    def _refusal(self, parent_path: str) -> str | None:
        """Why a parent at `parent_path` cannot place this cell, or None if it can."""
        names = parent_path.split(PATH_SEPARATOR)
        if self.name in names:
            return (
                f"cycle in the registry: parent path {parent_path[:200]} holds {self.name} "
                "already; fix the cells tables"
            )
        if len(names) + 1 > self.view.max_hop_count:
            return (
                f"too deep: {len(names) + 1} levels is past the hop limit {self.view.max_hop_count}"
            )
        return None

    # -- liveness -----------------------------------------------------------------------

    def heard(self, peer: Peer, now: float) -> None:
        tracker = self.trackers.get(peer)
        if tracker is not None:
            before = tracker.state
            if tracker.heard(now) is not before:
                logs.event(log, logging.INFO, "neighbour.alive", peer=peer, was=before)

    def beat(self, now: float, wall: float) -> Outgoing:
        """Heartbeats for every neighbour; liveness moves on by the silence so far."""
        here = self.known_path
        beats: Outgoing = []
        for peer, tracker in self.trackers.items():
            your = child_path(here, peer.name) if here and peer.role is Role.CHILD else None
            beats.append(
                (peer, Heartbeat(id=new_message_id(), sent_at=wall, path=here, your_path=your))
            )
            before = tracker.state
            after = tracker.check(now)
            if after is not before:
                logs.event(
                    log,
                    logging.WARNING,
                    f"neighbour.{after.value}",
                    peer=peer,
                    silent_s=round(tracker.silent_for(now) or now - tracker.since, 1),
                )
        return beats

    def liveness(self, now: float) -> dict[Peer, Liveness]:
        return {peer: tracker.check(now) for peer, tracker in self.trackers.items()}

    def silence(self, now: float) -> dict[Peer, float | None]:
        """Seconds since each neighbour was last heard; None for one never heard."""
        return {peer: tracker.silent_for(now) for peer, tracker in self.trackers.items()}
