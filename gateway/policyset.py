"""Read every policy file together, validate them as a whole, and swap them in atomically.

The policy set is workflows.yaml, retention.yaml and subprocessors.yaml of
one directory.  They refer to each other (a workflow tags mail with a tag that
retention.yaml defines), so they are validated together and take effect
together: a ``PolicySet`` is immutable, and the daemon holds exactly one at a
time.  A message is processed under the set that was in force when its
processing began; a reload replaces the reference, never the contents.

Each file is read once, and its bytes are what is both validated and hashed,
so the version reported is the version in force (a file changed between the
read and the check cannot slip in).

An empty file (or one of only comments) is refused, not read as "no rules": a
file truncated to nothing, or caught while its writer has written nothing yet,
looks the same.  Saying "no rules" takes an explicit ``tenants: {}``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from gateway.errors import ConfigError
from gateway.policy import retention, subprocessors
from gateway.policy.retention import Hold, RetentionPolicy
from gateway.policy.subprocessors import SubprocessorPolicy
from gateway.store.holds import HoldStore
from gateway.store.repository import Store
from gateway.workflow import loader as workflow_loader
from gateway.workflow.loader import Workflows
from gateway.yamlfile import YamlDocument, YamlFileError, parse_bytes, read_regular

log = logging.getLogger(__name__)

WORKFLOWS = "workflows.yaml"
RETENTION = "retention.yaml"
SUBPROCESSORS = "subprocessors.yaml"
FILES = (RETENTION, SUBPROCESSORS, WORKFLOWS)
# How to say "nothing here" in a file, for the error on an empty one.
SAY_NOTHING = {WORKFLOWS: "; for no rules, write `tenants: {}`",
               RETENTION: "; for no tags, write the default period only, e.g. `default: 1y`"}


class PolicyError(ConfigError):
    """A policy set that does not validate; ``problems`` are ``file:line:column: message``."""


@dataclass(frozen=True)
class PolicySet:
    """One validated version of every policy file, used as a whole."""

    workflows: Workflows = field(default_factory=Workflows)
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    # None without subprocessors.yaml: copies go through delivery.relay (or MX) unrestricted
    subprocessors: SubprocessorPolicy | None = None
    version: str = "none"  # hash of the files' bytes
    files: tuple[str, ...] = ()  # the files present
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    digests: tuple[tuple[str, str], ...] = ()  # (file, hash of its bytes) of each present

    def changed_since(self, previous: PolicySet) -> list[str]:
        """The files added, removed or edited since ``previous``."""
        before, after = dict(previous.digests), dict(self.digests)
        return sorted(name for name in before.keys() | after.keys()
                      if before.get(name) != after.get(name))


def read_files(directory: Path) -> dict[str, bytes]:
    """The bytes of each policy file present (missing files are absent from the result);
    PolicyError when one cannot be read, is not a regular file or is too large, and
    when the directory is not there or holds none of them: a wrong
    ``policies.directory`` must not run the gateway with no policy at all."""
    if not directory.is_dir():
        raise PolicyError([f"{directory}: no such directory (policies.directory; a relative "
                           "path is read from the folder of the configuration file)"])
    contents: dict[str, bytes] = {}
    problems: list[str] = []
    for name in FILES:
        try:
            contents[name] = read_regular(directory / name)
        except FileNotFoundError:
            continue
        except YamlFileError as exc:
            problems.append(str(exc))
    if problems:
        raise PolicyError(problems)
    if not contents:
        raise PolicyError([f"{directory}: none of {', '.join(FILES)} is there (is "
                           "policies.directory right? For no rules at all, write "
                           "workflows.yaml saying `tenants: {}`)"])
    return contents


def snapshot(directory: Path) -> tuple[tuple[str, int, int, int] | tuple[str], ...]:
    """What the watcher compares: each policy file's mtime, size and inode (or absence)."""
    out: list[tuple[str, int, int, int] | tuple[str]] = []
    for name in FILES:
        try:
            st = (directory / name).stat()
        except OSError:
            out.append((name,))
        else:
            out.append((name, st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


def version_of(contents: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in sorted(contents):
        digest.update(name.encode() + b"\0" + hashlib.sha256(contents[name]).digest())
    return digest.hexdigest()[:12]


def _document(directory: Path, name: str, contents: dict[str, bytes],
              problems: list[str]) -> YamlDocument | None:
    if name not in contents:
        return None
    try:
        doc = parse_bytes(contents[name], str(directory / name))
    except YamlFileError as exc:
        problems.append(str(exc))
        return None
    if doc.data is None:
        problems.append(f"{doc.path}: the file is empty (refused: a half-written file looks "
                        f"the same){SAY_NOTHING.get(name, '')}")
        return None
    return doc


def build(directory: Path, contents: dict[str, bytes], tenants: Collection[str],
          destinations: Collection[str]) -> PolicySet:
    """Validate the files' contents as one set; PolicyError lists every problem."""
    problems: list[str] = []
    docs = {name: _document(directory, name, contents, problems) for name in FILES}
    policy = RetentionPolicy()
    tags: Collection[str] = ()
    retention_doc, workflows_doc = docs[RETENTION], docs[WORKFLOWS]
    if retention_doc is not None:
        policy, found = retention.check(retention_doc, tenants)
        problems += found
        tags = policy.tags.keys()
    elif RETENTION not in contents:
        log.debug("no %s: untagged retention default applies", directory / RETENTION)
    workflows = Workflows()
    if workflows_doc is not None:
        # With retention.yaml present but unreadable, its own error is reported;
        # a second "unknown tag" for every tag a workflow uses would only bury it.
        known = None if RETENTION in contents and retention_doc is None else tags
        workflows, found = workflow_loader.check(workflows_doc, tenants, destinations, known)
        problems += found
    routing = None
    subprocessors_doc = docs[SUBPROCESSORS]
    if subprocessors_doc is not None:
        known = None if RETENTION in contents and retention_doc is None else tags
        routing, found = subprocessors.check(subprocessors_doc, tenants, known)
        problems += found
    if problems:
        raise PolicyError(problems)
    return PolicySet(workflows=workflows, retention=policy, subprocessors=routing,
                     version=version_of(contents), files=tuple(sorted(contents)),
                     digests=tuple((name, version_of({name: data}))
                                   for name, data in sorted(contents.items())))


def load(directory: Path, tenants: Collection[str],
         destinations: Collection[str]) -> PolicySet:
    """Read and validate the policy directory; raises PolicyError."""
    return build(directory, read_files(directory), tenants, destinations)


class PolicyHolder:
    """The policy set in force.  ``reload()`` swaps in a new one only when it validates.

    Readers call ``current`` once per unit of work and keep what they got; the
    swap is a single reference assignment, so nobody sees half a set.
    """

    def __init__(self, directory: Path, tenants: Collection[str],
                 destinations: Collection[str], initial: PolicySet) -> None:
        self.directory = directory
        self.tenants = tenants
        self.destinations = destinations
        self.current = initial

    def get(self) -> PolicySet:
        return self.current

    def workflows(self) -> Workflows:
        return self.current.workflows

    def reload(self) -> bool:
        """Read and validate the directory again; True if a new version took effect.

        Raises PolicyError, leaving the set in force untouched, when anything
        does not validate, and also when a file in force has disappeared: a
        deleted retention.yaml would otherwise silently mean "defaults for all".
        """
        contents = read_files(self.directory)
        if version_of(contents) == self.current.version:
            return False
        gone = [name for name in self.current.files if name not in contents]
        if gone:
            raise PolicyError([
                f"{self.directory / name}: the file was removed; the policy in force keeps it "
                "(restore it, or restart the daemon to run without it)" for name in gone
            ])
        self.current = build(self.directory, contents, self.tenants, self.destinations)
        return True


def retention_in_force(policy: RetentionPolicy, store: Store) -> RetentionPolicy:
    """The retention policy with the legal holds tenants placed through the admin API
    beside those of retention.yaml: what everything that deletes mail must respect."""
    placed = tuple(Hold(r["name"], r["reason"], r["tenant_id"], r["address"], r["tag"],
                        r["until"]) for r in HoldStore(store).in_force())
    return dataclasses.replace(policy, holds=policy.holds + placed) if placed else policy

