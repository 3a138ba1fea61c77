"""Which data folder a Chroma server belongs to: one knowledge base per server (or per ``KB_CHROMA_URL``).

Collections are named by chunk config and embedding model (``kb-<hash>-<model>``), so two data folders pointed at one
server with the same settings wrote into the same collection: the second's first sync "reused" the first's vectors,
its searches returned the other's documents, and ``kb verify --repair`` in either deleted the other's chunks as
"unknown source" (an operator review). The first knowledge base to use a server now claims it, in a small hidden
collection holding its id (kept in its manifest) and its ``KB_HOME``; any other is refused with both named.

Several processes on one ``KB_HOME`` (the dashboard, ``kb watch``, the CLI; DESIGN §7) share the id, so they share
the server as before. A server used before this check is claimed by the first data folder whose manifest records one
of its collections; a server holding only collections that this folder does not record is refused.
"""

from __future__ import annotations

import datetime as dt
import secrets
from pathlib import Path

from chromadb.errors import NotFoundError

from kb.errors import KBError
from kb.store.index import PREFIX, STAGING_PREFIX, passage_collection

OWNER = PREFIX + "owner"  # "kbp-…": hidden from every collection listing, like passage collections
ID_KEY = "kb_id"  # in the manifest's meta table


class ServerOwnedElsewhere(KBError):
    """The Chroma server belongs to another data folder: using it would mix, and repair away, each other's chunks."""


def kb_id(manifest) -> str:
    """This data folder's id, made on first need and kept in its manifest (a copy of the folder keeps it)."""
    value = manifest.get_meta(ID_KEY)
    if not value:
        with manifest.transaction() as con:  # never replaced: another process may have made it first
            con.execute("INSERT OR IGNORE INTO meta VALUES (?,?)", (ID_KEY, secrets.token_hex(8)))
        value = manifest.get_meta(ID_KEY)
    return value


def recorded(manifest) -> set[str]:
    """The collections this data folder's manifest knows: its live one, every recorded one, and their passages."""
    names = set(manifest.collection_rows())
    if manifest.live_collection:
        names.add(manifest.live_collection)
    return names | {passage_collection(n) for n in names}


def claim(client, manifest, home: Path, url: str) -> None:
    """Claim the server for this data folder, or raise :class:`ServerOwnedElsewhere` when it is another's."""
    mine = kb_id(manifest)
    try:
        owner = client.get_collection(OWNER, embedding_function=None)
    except (NotFoundError, ValueError):
        owner = None
    if owner is None:
        held = {c.name for c in client.list_collections()} - {OWNER}
        held = {n for n in held if not n.startswith(STAGING_PREFIX)}  # an import's staging, removed by the next
        if held and not held & recorded(manifest):
            names = ", ".join(sorted(held)[:3]) + (" …" if len(held) > 3 else "")
            raise ServerOwnedElsewhere(
                f"the Chroma server at {url} holds collections that {home} does not record ({names}): another data "
                "folder's knowledge base. Two data folders on one server would share, and repair away, each other's "
                "chunks. Give this one its own server (KB_CHROMA_URL), or use the data folder those collections "
                "belong to (KB_HOME)")
        owner = client.get_or_create_collection(
            OWNER, embedding_function=None,
            metadata={ID_KEY: mine, "kb_home": str(home), "claimed": dt.datetime.now(dt.timezone.utc).isoformat()})
    meta = owner.metadata or {}
    if meta.get(ID_KEY) != mine:  # another data folder's, or one that claimed it in the same moment
        raise ServerOwnedElsewhere(
            f"the Chroma server at {url} belongs to the knowledge base in {meta.get('kb_home', 'another data folder')} "
            f"(claimed {str(meta.get('claimed', '?'))[:19]}), not to {home}. Two data folders on one server would "
            "share, and repair away, each other's chunks: give this one its own server (KB_CHROMA_URL), or use that "
            "data folder (KB_HOME)")
