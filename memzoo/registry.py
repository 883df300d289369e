"""The mixer registry: every sequence memory in memzoo, by name.

A mixer maps [batch, time, d_model] -> [batch, time, d_model] and is built by a constructor
`f(d_model, *, rngs, **options) -> nnx.Module`. Each family registers its own names when its
module is imported (memzoo/__init__ imports them all), so `MIXERS` lists everything available.

Every mixer also speaks the decoding protocol `SequenceMixer` below.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Callable, Iterator, Protocol

from flax import nnx

MixerConstructor = Callable[..., nnx.Module]


class UnknownMixerError(KeyError, ValueError):
    """Raised for a name that is not registered; both a KeyError (mapping) and a ValueError
    (bad configuration value), so callers can catch whichever fits their context."""

    def __str__(self) -> str:  # KeyError would repr() the message, quoting it.
        return str(self.args[0])


class _Registry(Mapping[str, MixerConstructor]):
    def __init__(self):
        self._entries: dict[str, MixerConstructor] = {}

    def __getitem__(self, name: str) -> MixerConstructor:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise UnknownMixerError(f"unknown mixer {name!r}; known mixers: {known}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"MIXERS({', '.join(self)})"

    def register(self, name: str, constructor: MixerConstructor) -> MixerConstructor:
        if not isinstance(name, str) or not name:
            raise ValueError(f"register_mixer: name must be a non-empty string, got {name!r}")
        if name in self._entries and self._entries[name] is not constructor:
            raise ValueError(f"register_mixer: {name!r} is already registered "
                             f"to {self._entries[name]!r}")
        self._entries[name] = constructor
        return constructor

    def build(self, name: str, d_model: int, *, rngs: nnx.Rngs, **options: Any) -> nnx.Module:
        return self[name](d_model, rngs=rngs, **options)


MIXERS = _Registry()


def register_mixer(name: str) -> Callable[[MixerConstructor], MixerConstructor]:
    """Class or function decorator: `@register_mixer("s4d")` adds it to MIXERS under `name`."""
    def decorate(constructor: MixerConstructor) -> MixerConstructor:
        return MIXERS.register(name, constructor)
    return decorate


def build_mixer(name: str, d_model: int, *, rngs: nnx.Rngs, **options: Any) -> nnx.Module:
    return MIXERS.build(name, d_model, rngs=rngs, **options)


class SequenceMixer(Protocol):
    """The API every registered mixer keeps.

    y = mixer(x)                     x, y: [b, t, d]; the parallel (training) form
    y, cache = mixer(x, cache=c)     prefill: continue from cache c, return the cache after x
    cache = mixer.init_cache(b)      the state before any token (a pytree of arrays)
    y_t, cache = mixer.step(x_t, c)  decode one token, x_t, y_t: [b, d]

    Two optional keywords, which models pass only to mixers that declare them by name
    (`accepts_keyword`):

    mixer(x, segment_ids=s)          s: [b, t] int, packed documents: no information crosses a
                                     change of id (attention masks across it; the recurrent and
                                     test-time memories restart from their initial state, the
                                     neural memories chunk each document from its own first
                                     token), so each document gets, to rounding, what it gets
                                     alone. Every registered mixer has the keyword; a
                                     memzoo.models.Block given segment_ids for a mixer without
                                     it raises a ValueError instead of letting documents mix.
    mixer.init_cache(b, max_len=n)   for mixers whose state grows with the sequence (attention's
                                     KV cache): room for n tokens.

    Decoding packed documents (an extension; today "hippo_rnn", "neural_memory", "moneta",
    "yaad", "memora", "titans_mac", "titans_mag", "titans_mal" have it):

    y, c = mixer(x, cache=c, segment_ids=s)      s [b, t]
    y_t, c = mixer.step(x_t, c, segment_ids=s_t) s_t [b]

    The cache remembers each row's current document id (init_cache: 0); a token whose id
    differs from the one before it, the cache's included, begins a new document in that row,
    which restarts from init_cache's state. Without segment_ids a call continues the row's
    document. The other mixers' caches keep no id: with a cache, attention and the linear
    attention family reject segment_ids (ValueError), the SSMs restart at the id changes inside
    the call with token 0 continuing the cache's document; their step has no such keyword
    (start a fresh cache for a new document).
    """
    def __call__(self, x, cache=None, *, segment_ids=None): ...

    def init_cache(self, batch_size: int): ...

    def step(self, x_t, cache): ...


def accepts_keyword(fn: Callable[..., Any], name: str) -> bool:
    """Whether `fn` declares parameter `name` explicitly (a **kwargs catch-all does not count:
    it could swallow segment_ids and silently let documents see each other)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
