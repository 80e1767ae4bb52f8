"""The secure-aggregation protocol alone (``fedtune.privacy.secagg``): exact sums, dropouts at every phase,
aborts below the threshold, key substitution, mask properties, and what the server object ever holds."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedtune.privacy import secagg
from fedtune.privacy.secagg import (
    KeySubstitution,
    SecAggAbort,
    SecAggClient,
    SecAggServer,
    default_neighbours,
    dequantize,
    identity_public,
    neighbours,
    prg,
    quantize,
    shamir_combine,
    shamir_split,
    threshold,
)

WORDS = 257


def play(n: int, *, drop: dict[str, set[str]] | None = None, k: int | None = None, fraction: float = 0.5,
         seed: int = 0, server: SecAggServer | None = None, tamper=None):
    """One round among ``n`` clients; ``drop[phase]`` leave before answering that phase. Returns the server's
    sum (uint32), the survivors' plain sum and the server."""
    drop = drop or {}
    rng = np.random.default_rng(seed)
    ids = [f"c{i:02d}" for i in range(n)]
    idents = {c: Ed25519PrivateKey.generate() for c in ids}
    trusted = {c: identity_public(key) for c, key in idents.items()}
    xs_plain = {c: rng.integers(0, 2**32, WORDS, dtype=np.uint32) for c in ids}
    k = default_neighbours(n) if k is None else k
    srv = server or SecAggServer(round=3, t=threshold(k, fraction), k=k, seed=seed)
    clients = {c: SecAggClient(c, 3, idents[c]) for c in ids}
    alive = [c for c in ids if c not in drop.get("advertise", set())]
    srv.take_adverts([clients[c].advertise() for c in alive])
    if tamper:
        tamper(srv)
    xs = srv.xs()
    alive = [c for c in alive if c not in drop.get("share", set())]
    srv.take_shares({c: clients[c].share_keys(srv.neighbour_adverts(c), trusted, xs, srv.t) for c in alive})
    alive = [c for c in alive if c not in drop.get("upload", set())]
    for c in alive:
        srv.add(c, clients[c].masked(xs_plain[c], srv.inbox(c), srv.senders(c)))
    answering = [c for c in alive if c not in drop.get("unmask", set())]
    answers = {c: clients[c].unmask(srv.uploaded, srv.dropped()) for c in answering}
    total = srv.unmask(answers)
    plain = np.zeros(WORDS, dtype=np.uint32)
    for c in alive:
        plain += xs_plain[c]
    return total, plain, srv


@pytest.mark.parametrize("n", [3, 4, 7, 12, 50])
def test_the_sum_is_the_plain_sum_exactly(n: int) -> None:
    total, plain, _ = play(n, seed=n)
    assert np.array_equal(total, plain)


@pytest.mark.parametrize("phase", ["advertise", "share", "upload", "unmask"])
def test_dropouts_at_each_phase_up_to_the_threshold_recover(phase: str) -> None:
    n = 10  # k = 9 (everyone), t = 5: up to 4 may leave at any phase (at unmask, 5 of 9 neighbours remain)
    gone = {f"c{i:02d}" for i in (1, 4, 6, 8)}
    total, plain, srv = play(n, drop={phase: gone}, k=9)
    assert srv.t == 5 and np.array_equal(total, plain)
    survivors = [c for c in (f"c{i:02d}" for i in range(n)) if phase == "unmask" or c not in gone]
    assert sorted(srv.uploaded) == sorted(survivors)


def test_dropouts_in_several_phases_with_a_sparse_graph() -> None:
    drop = {"share": {"c03"}, "upload": {"c10", "c17"}, "unmask": {"c21"}}
    total, plain, srv = play(30, drop=drop, seed=5)
    assert srv.k == default_neighbours(30) == 12 and np.array_equal(total, plain)


@pytest.mark.parametrize("phase", ["share", "upload", "unmask"])
def test_below_the_threshold_the_round_aborts_and_reveals_nothing(phase: str) -> None:
    gone = {f"c{i:02d}" for i in range(5)}  # 5 of 8 leave, t = 4 of k = 7
    with pytest.raises(SecAggAbort, match="nothing is revealed"):
        play(8, drop={phase: gone}, k=7)


def test_a_substituted_key_is_detected_by_the_peers() -> None:
    def swap(srv: SecAggServer) -> None:  # a malicious server puts its own mask key in for c01
        ad = srv.adverts["c01"]
        fake = X25519PrivateKey.generate().public_key().public_bytes(*secagg._RAW)
        srv.adverts["c01"] = secagg.Advert(ad.cid, ad.c_pk, fake, ad.sig)

    with pytest.raises(KeySubstitution, match="'c01'.*not signed by its identity"):
        play(5, tamper=swap)


def test_a_key_signed_for_another_round_is_refused() -> None:
    key = Ed25519PrivateKey.generate()
    ad = SecAggClient("c1", 2, key).advertise()
    ad.verify(2, identity_public(key))
    with pytest.raises(KeySubstitution):
        ad.verify(3, identity_public(key))


def test_a_client_never_reveals_both_secrets_of_a_peer() -> None:
    client = SecAggClient("c0", 1, Ed25519PrivateKey.generate())
    client.held = {"c1": {"b": [1, 5], "s": [1, 6]}}
    with pytest.raises(ValueError, match="both survivor and dropped"):
        client.unmask(["c1"], ["c1"])
    assert client.unmask(["c1"], []) == {"c1": {"b": [1, 5]}}
    with pytest.raises(ValueError, match="already revealed"):
        client.unmask([], ["c1"])


def test_masks_are_deterministic_per_key_and_differ_per_pair() -> None:
    a, b, c = (X25519PrivateKey.generate() for _ in range(3))
    pub = {n: k.public_key().public_bytes(*secagg._RAW) for n, k in {"a": a, "b": b, "c": c}.items()}
    ab = secagg.pair_mask_key(a, pub["b"], 1, "a", "b")
    assert ab == secagg.pair_mask_key(b, pub["a"], 1, "b", "a")  # both ends agree
    assert ab != secagg.pair_mask_key(a, pub["c"], 1, "a", "c")
    assert ab != secagg.pair_mask_key(a, pub["b"], 2, "a", "b")  # fresh per round
    assert np.array_equal(prg(ab, 1000), prg(ab, 1000))
    assert np.array_equal(prg(ab, 1000)[:10], prg(ab, 10))
    assert not np.array_equal(prg(ab, 1000), prg(secagg.pair_mask_key(a, pub["c"], 1, "a", "c"), 1000))


def test_add_mask_adds_the_keystream_in_place_across_chunks() -> None:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = bytes(range(32))
    words = 3 * 2**16 + 5  # three full chunks of the reused buffer and a partial one
    # the keystream is AES-256-CTR's encryption of zeros, chunked or not
    whole = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor().update(bytes(4 * words))
    assert np.array_equal(prg(key, words), np.frombuffer(whole, dtype=np.uint32))
    y = np.arange(words, dtype=np.uint32) * np.uint32(2654435761)
    want = y + prg(key, words)  # wraps modulo 2^32
    out = secagg.add_mask(y, key)
    assert out is y and np.array_equal(y, want)
    secagg.add_mask(y, key, -1)
    assert np.array_equal(y, np.arange(words, dtype=np.uint32) * np.uint32(2654435761))
    with pytest.raises(ValueError, match="32 bytes"):
        secagg.add_mask(y, key[:16])


def test_a_masked_vector_looks_uniform_whatever_the_update() -> None:
    """The server's view of one masked vector: for an all-zero update and a constant one, the masked words
    are uniform on Z_2^32 (chi-square over 256 buckets of the top byte) and uncorrelated with the update."""
    ids = ["a", "b", "c"]
    idents = {c: Ed25519PrivateKey.generate() for c in ids}
    trusted = {c: identity_public(k) for c, k in idents.items()}
    views = []
    for update in (np.zeros(65536, dtype=np.uint32), np.full(65536, 12345, dtype=np.uint32)):
        srv = SecAggServer(round=1, t=2, k=2, seed=0)
        cl = {c: SecAggClient(c, 1, idents[c]) for c in ids}
        srv.take_adverts([cl[c].advertise() for c in ids])
        srv.take_shares({c: cl[c].share_keys(srv.neighbour_adverts(c), trusted, srv.xs(), 2) for c in ids})
        views.append(cl["a"].masked(update, srv.inbox("a"), srv.senders("a")))
    for y in views:
        counts = np.bincount((y >> 24).astype(np.int64), minlength=256)
        expected = y.size / 256
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 340  # 255 degrees of freedom: p < 0.0003 above 340
    assert abs(np.corrcoef(views[0].astype(np.float64), views[1].astype(np.float64))[0, 1]) < 0.02


def test_the_server_holds_only_masked_vectors() -> None:
    seen: list[np.ndarray] = []

    class Watching(SecAggServer):
        def add(self, cid: str, y: np.ndarray) -> None:
            seen.append(np.array(y, copy=True))
            super().add(cid, y)

    n = 6
    srv = Watching(round=3, t=threshold(5, 0.5), k=5, seed=1)
    total, plain, _ = play(n, seed=1, k=5, server=srv)
    assert np.array_equal(total, plain) and len(seen) == n
    rng = np.random.default_rng(1)
    updates = [rng.integers(0, 2**32, WORDS, dtype=np.uint32) for _ in range(n)]
    for y in seen:  # no received vector equals, or is within a small distance of, any client's update
        for x in updates:
            assert np.count_nonzero(y == x) < 3
    held = [v for v in vars(srv).values() if isinstance(v, np.ndarray)]
    assert len(held) == 1 and np.array_equal(held[0], sum(seen, np.zeros(WORDS, np.uint32)))


def test_fixed_point_sums_round_trip() -> None:
    rng = np.random.default_rng(0)
    values = rng.uniform(-0.5, 0.5, (50, 1000))
    scale = secagg.fixed_point_scale(0.5, 50)
    total = np.zeros(1000, dtype=np.uint32)
    for v in values:
        total += quantize(v, scale)
    assert np.allclose(dequantize(total, scale), values.sum(0), atol=50 / scale)


def test_shamir_any_t_shares_rebuild_fewer_do_not() -> None:
    secret = int.from_bytes(bytes(range(32)), "big")
    shares = shamir_split(secret, 4, range(1, 8))
    assert shamir_combine({x: shares[x] for x in (2, 3, 5, 7)}, 4) == secret
    assert shamir_combine({x: shares[x] for x in (1, 4, 6, 7)}, 4) == secret
    wrong = shamir_combine({x: shares[x] for x in (1, 2, 3)} | {9: 0}, 4)
    assert wrong != secret
    with pytest.raises(SecAggAbort):
        shamir_combine({x: shares[x] for x in (1, 2, 3)}, 4)


def test_the_neighbour_graph_is_k_regular_and_symmetric() -> None:
    ids = [f"n{i}" for i in range(40)]
    g = neighbours(ids, 8, seed=3)
    assert all(len(v) == 8 for v in g.values())
    assert all(a in g[b] for a in g for b in g[a])
    assert g == neighbours(reversed(ids), 8, seed=3) and g != neighbours(ids, 8, seed=4)


def test_client_state_survives_plain_round_trip() -> None:
    key = Ed25519PrivateKey.generate()
    c = SecAggClient("c0", 4, key)
    c.held = {"c1": {"b": [2, 2**300], "s": [2, 7]}}
    back = SecAggClient.from_plain(c.to_plain(), key)
    assert back.to_plain() == c.to_plain() and back.advertise().s_pk == c.advertise().s_pk


def test_clients_restored_between_phases_mask_and_unmask_exactly() -> None:
    """As the phase handlers do: each client is saved to plain values after sharing keys and restored before
    it masks (its neighbours' share keys travel in that state); the sum is still exact."""
    n = 6
    ids = [f"c{i}" for i in range(n)]
    idents = {c: Ed25519PrivateKey.generate() for c in ids}
    trusted = {c: identity_public(k) for c, k in idents.items()}
    xs_plain = {c: np.random.default_rng(i).integers(0, 2**32, WORDS, dtype=np.uint32) for i, c in enumerate(ids)}
    srv = SecAggServer(round=2, t=3, k=4, seed=0)
    clients = {c: SecAggClient(c, 2, idents[c]) for c in ids}
    srv.take_adverts([clients[c].advertise() for c in ids])
    srv.take_shares({c: clients[c].share_keys(srv.neighbour_adverts(c), trusted, srv.xs(), srv.t) for c in ids})
    saved = {c: clients[c].to_plain() for c in ids}
    assert all(len(saved[c]["share_keys"]) == 4 for c in ids)  # type: ignore[arg-type]
    for c in ids[:-1]:  # the last one drops out after sharing keys
        restored = SecAggClient.from_plain(saved[c], idents[c])
        srv.add(c, restored.masked(xs_plain[c], srv.inbox(c), srv.senders(c)))
        saved[c] = restored.to_plain()
    answers = {c: SecAggClient.from_plain(saved[c], idents[c]).unmask(srv.uploaded, srv.dropped()) for c in ids[:-1]}
    assert np.array_equal(srv.unmask(answers), sum((xs_plain[c] for c in ids[:-1]), np.zeros(WORDS, np.uint32)))
    tampered = dict(saved["c0"], share_keys={p: "00" * 32 for p in saved["c0"]["share_keys"]})  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="does not decrypt"):
        SecAggClient.from_plain(tampered, idents["c0"]).masked(xs_plain["c0"], srv.inbox("c0"), srv.senders("c0"))


def test_fixed_point_in_place_gives_the_same_words() -> None:
    x = np.random.default_rng(3).normal(0, 0.1, 10_001)
    scale = secagg.fixed_point_scale(1.0, 20)
    expected = quantize(x, scale)
    scratch = x.copy()
    assert np.array_equal(quantize(scratch, scale, overwrite=True), expected)
    with pytest.raises(ValueError, match="32-bit range"):
        quantize(np.array([1e10]), scale, overwrite=True)
