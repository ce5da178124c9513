"""Deficit round robin (DRR) between the tenants of one tier: each turn a tenant gets
`quantum × weight` tokens of credit and runs requests while its credit covers their
tokens; an idle tenant's credit is dropped. Equal weights get equal token shares over
time whatever their request sizes (Shreedhar & Varghese, 1996)."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.admission.queues import Ticket


class TierQueue:
    """One tier's waiting requests: a FIFO per tenant, deficit round robin across them."""

    def __init__(self, quantum: int):
        self.quantum = quantum
        self.tenants: dict[str, deque[Ticket]] = {}
        self.turns: deque[str] = deque()  # tenants with requests; the head has the turn
        self.deficit: dict[str, float] = {}
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def push(self, ticket: Ticket) -> None:
        fifo = self.tenants.get(ticket.tenant)
        if fifo is None:
            fifo = self.tenants[ticket.tenant] = deque()
            self.turns.append(ticket.tenant)
            self.deficit[ticket.tenant] = 0.0
            if len(self.turns) == 1:
                self._credit(ticket.tenant, ticket.weight)
        fifo.append(ticket)
        self.size += 1

    def _credit(self, tenant: str, weight: float) -> None:
        self.deficit[tenant] += self.quantum * weight

    def peek(self) -> Ticket | None:
        """The request DRR serves next. Repeated peeks return the same one."""
        if not self.turns:
            return None
        while True:
            head = self.tenants[self.turns[0]][0]
            if self.deficit[self.turns[0]] >= head.tokens:
                return head
            self.turns.rotate(-1)  # this tenant's turn is over; the next gets its credit
            nxt = self.tenants[self.turns[0]][0]
            self._credit(nxt.tenant, nxt.weight)

    def remove(self, ticket: Ticket, served: bool = False) -> bool:
        fifo = self.tenants.get(ticket.tenant)
        if fifo is None or ticket not in fifo:
            return False
        if served:
            self.deficit[ticket.tenant] -= ticket.tokens
        fifo.remove(ticket)
        self.size -= 1
        if not fifo:
            was_turn = self.turns[0] == ticket.tenant
            self.turns.remove(ticket.tenant)
            del self.tenants[ticket.tenant], self.deficit[ticket.tenant]
            if was_turn and self.turns:
                nxt = self.tenants[self.turns[0]][0]
                self._credit(nxt.tenant, nxt.weight)
        return True

    def oldest(self) -> float:
        return min(fifo[0].arrival for fifo in self.tenants.values())

    def tickets(self) -> list[Ticket]:
        return [t for fifo in self.tenants.values() for t in fifo]
