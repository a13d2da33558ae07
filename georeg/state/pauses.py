"""Registry pauses: a registry's "retry after" (a 429), shared through the database so that every
worker slows down, not only the one that was told (see `georeg.limits.RegistryPause`)."""

from __future__ import annotations

from sqlalchemy import Float, String, case, select
from sqlalchemy.orm import Mapped, mapped_column

from georeg.state.database import Base, Database


class PauseRow(Base):
    __tablename__ = "georeg_pauses"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)  # georeg-pause-<host>-<port>
    until: Mapped[float] = mapped_column(Float)


class Pauses:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def pause(self, registry: str, until: float) -> None:
        """No request to `registry` before `until` (a pause already longer is kept)."""
        insert = self._db.insert(PauseRow).values(name=registry, until=until)
        later = case((PauseRow.until > insert.excluded.until, PauseRow.until), else_=insert.excluded.until)
        await self._db.execute(insert.on_conflict_do_update(index_elements=["name"], set_={"until": later}))

    async def paused_until(self, registry: str) -> float:
        """When requests to `registry` may go on (0 if it was never paused)."""
        async with self._db.transaction() as session:
            return await session.scalar(select(PauseRow.until).where(PauseRow.name == registry)) or 0.0
