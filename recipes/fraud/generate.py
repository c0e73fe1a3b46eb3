"""Deterministic synthetic card transactions for the ``fraud`` recipe.

Every card gets a spending profile (home country, a log-normal typical amount, preferred
merchant categories and channels, an activity rate, a preferred time of day, sometimes a trip
abroad). Legitimate transactions follow that profile. About 6 % of cards are compromised at some
point in the window: from then on a fraudster runs a burst of transactions that are larger than
the card's usual amounts, often abroad or card-not-present, in risky categories and at odd hours.
A few isolated fraudulent transactions and a "stealth" fraud style that mimics the owner add
noise, and legitimate travellers, gamblers and night owls look risky without being fraud.

    uv run python recipes/fraud/generate.py --seed 7 --cards 5000 --days 30 --out recipes/fraud/data

Same arguments, same ``transactions.parquet`` (byte for byte with the same numpy/pyarrow).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

Array = NDArray[Any]

HERE = Path(__file__).resolve().parent
DEFAULT_SEED = 7
DEFAULT_CARDS = 5_000
DEFAULT_DAYS = 30
#: The window ends here (exclusive); it is fixed so that the data never depends on today's date.
END = pd.Timestamp("2026-11-01T00:00:00Z")

CATEGORIES = (
    "grocery",
    "restaurant",
    "fuel",
    "travel",
    "electronics",
    "online_retail",
    "gambling",
    "entertainment",
    "pharmacy",
    "clothing",
    "utilities",
    "cash_withdrawal",
)
CHANNELS = ("pos", "contactless", "online", "atm")

# How popular each category is across cards, and its amount relative to the card's typical one.
_CAT_BASE = np.array([0.22, 0.17, 0.09, 0.02, 0.03, 0.14, 0.01, 0.07, 0.05, 0.07, 0.05, 0.08])
_CAT_LOG_OFFSET = np.array([0.2, -0.1, 0.3, 1.8, 1.4, 0.3, 0.6, 0.0, -0.3, 0.6, 0.9, 0.9])
# P(channel | category), columns as CHANNELS.
_CAT_CHANNEL = np.array(
    [
        [0.50, 0.45, 0.05, 0.00],  # grocery
        [0.50, 0.45, 0.05, 0.00],  # restaurant
        [0.60, 0.40, 0.00, 0.00],  # fuel
        [0.20, 0.05, 0.75, 0.00],  # travel
        [0.45, 0.10, 0.45, 0.00],  # electronics
        [0.00, 0.00, 1.00, 0.00],  # online_retail
        [0.10, 0.00, 0.90, 0.00],  # gambling
        [0.30, 0.30, 0.40, 0.00],  # entertainment
        [0.50, 0.50, 0.00, 0.00],  # pharmacy
        [0.50, 0.30, 0.20, 0.00],  # clothing
        [0.00, 0.00, 1.00, 0.00],  # utilities
        [0.00, 0.00, 0.00, 1.00],  # cash_withdrawal
    ]
)
_HOME = {
    "US": 0.30, "GB": 0.12, "DE": 0.10, "FR": 0.08, "CA": 0.06, "ES": 0.06, "IT": 0.06,
    "NL": 0.05, "AU": 0.04, "BR": 0.04, "IN": 0.03, "JP": 0.03, "MX": 0.03,
}  # fmt: skip
_TRAVEL = ("ES", "FR", "IT", "US", "GB", "MX", "TH", "PT", "GR", "JP", "DE", "TR")
_ONLINE_ABROAD = ("US", "GB", "IE", "NL", "CN", "LU")
_RISKY = ("NG", "RU", "RO", "UA", "BR", "CN", "VN", "ID", "PH", "TR", "MY", "CO")
COUNTRIES = tuple(sorted(set(_HOME) | set(_TRAVEL) | set(_ONLINE_ABROAD) | set(_RISKY)))
# When people shop (UTC hour; the synthetic world has one time zone).
_DIURNAL = np.array(
    [0.4, 0.2, 0.1, 0.1, 0.1, 0.3, 0.8, 1.8, 3.0, 3.6, 4.2, 4.8,
     5.6, 5.2, 4.6, 4.4, 4.6, 5.2, 5.8, 5.6, 4.6, 3.4, 2.0, 1.0]
)  # fmt: skip
_FRAUD_HOURS = np.array(
    [3.0, 3.4, 3.6, 3.4, 3.0, 2.2, 1.4, 1.2, 1.4, 1.8, 2.0, 2.2,
     2.4, 2.4, 2.2, 2.2, 2.2, 2.4, 2.6, 2.8, 3.0, 3.0, 3.0, 3.0]
)  # fmt: skip

#: share of cards that a fraudster takes over, per 30 days (so the fraud rate does not depend
#: on the length of the window)
COMPROMISE_RATE = 0.06
ISOLATED_FRAUD_RATE = 0.001  # single fraudulent transactions per legitimate one


def _choice_rows(rng: np.random.Generator, probs: Array) -> Array:
    """One category index per row of a row-stochastic matrix (vectorised inverse CDF)."""
    cum = np.cumsum(probs, axis=1)
    cum /= cum[:, -1:]
    u = rng.random(len(probs))[:, None]
    out: Array = np.minimum((u > cum).sum(axis=1), probs.shape[1] - 1)
    return out


def _profiles(rng: np.random.Generator, n_cards: int, days: int) -> dict[str, Array]:
    home_codes = np.array(list(_HOME))
    home_p = np.array(list(_HOME.values()))
    home = home_codes[rng.choice(len(home_codes), size=n_cards, p=home_p / home_p.sum())]
    travels = rng.random(n_cards) < 0.15
    trip_start = rng.uniform(0, days * 86_400, n_cards)
    trip_len = rng.uniform(2, 8, n_cards) * 86_400
    dest = np.array(_TRAVEL)[rng.integers(0, len(_TRAVEL), n_cards)]
    # a traveller never "travels" to their own country: redraw once, then fall back to PT
    same = dest == home
    dest[same] = np.array(_TRAVEL)[(rng.integers(0, len(_TRAVEL), same.sum()) + 1) % len(_TRAVEL)]
    dest = np.where(dest == home, "PT", dest)
    return {
        "home": home,
        "log_mu": rng.normal(np.log(28.0), 0.5, n_cards),
        "log_sigma": rng.uniform(0.4, 0.8, n_cards),
        "cat_pref": rng.dirichlet(_CAT_BASE * 8.0, n_cards),
        "contactless": rng.beta(2.0, 2.0, n_cards),
        "rate": np.clip(rng.gamma(2.0, 0.6, n_cards), 0.05, 8.0),  # transactions per day
        "hour_shift": rng.choice([-2, -1, 0, 0, 0, 1, 2, 3], n_cards),
        "travels": travels,
        "trip_start": trip_start,
        "trip_end": trip_start + trip_len,
        "trip_dest": dest,
    }


def _channels(rng: np.random.Generator, cat: Array, contactless: Array) -> Array:
    w = _CAT_CHANNEL[cat].copy()
    w[:, 0] *= 1.0 - contactless
    w[:, 1] *= contactless
    empty = w.sum(axis=1) == 0
    w[empty] = _CAT_CHANNEL[cat[empty]]
    return _choice_rows(rng, w)


def _amounts(rng: np.random.Generator, log_amount: Array, cat: Array) -> Array:
    amount = np.round(np.exp(log_amount), 2)
    cash = cat == CATEGORIES.index("cash_withdrawal")
    amount[cash] = np.maximum(20.0, np.round(amount[cash] / 10.0) * 10.0)
    out: Array = np.maximum(amount, 1.0)
    return out


def _legit(rng: np.random.Generator, prof: dict[str, Array], days: int) -> dict[str, Array]:
    n_cards = len(prof["home"])
    counts = rng.poisson(prof["rate"] * days)
    card = np.repeat(np.arange(n_cards), counts)
    n = len(card)
    day = rng.integers(0, days, n)
    hour = (rng.choice(24, size=n, p=_DIURNAL / _DIURNAL.sum()) + prof["hour_shift"][card]) % 24
    secs = day * 86_400 + hour * 3_600 + rng.integers(0, 3_600, n)
    cat = _choice_rows(rng, prof["cat_pref"][card])
    channel = _channels(rng, cat, prof["contactless"][card])
    log_amount = (
        prof["log_mu"][card]
        + _CAT_LOG_OFFSET[cat]
        + prof["log_sigma"][card] * rng.standard_normal(n)
    )
    country = prof["home"][card].copy()
    online = channel == CHANNELS.index("online")
    on_trip = (
        prof["travels"][card]
        & (secs >= prof["trip_start"][card])
        & (secs < prof["trip_end"][card])
        & ~online
    )
    country[on_trip] = prof["trip_dest"][card][on_trip]
    abroad_online = online & (rng.random(n) < 0.08)
    country[abroad_online] = np.array(_ONLINE_ABROAD)[rng.integers(0, 6, abroad_online.sum())]
    return {
        "card": card,
        "secs": secs.astype(np.int64),
        "cat": cat,
        "channel": channel,
        "amount": _amounts(rng, log_amount, cat),
        "country": country,
        "is_fraud": np.zeros(n, dtype=np.int8),
    }


def _fraud(
    rng: np.random.Generator, prof: dict[str, Array], days: int, n_legit: int
) -> dict[str, Array]:
    n_cards = len(prof["home"])
    span = days * 86_400
    victims = np.flatnonzero(rng.random(n_cards) < COMPROMISE_RATE * (days / DEFAULT_DAYS))
    burst = 1 + np.minimum(rng.poisson(4.5, len(victims)), 19)
    # the burst starts on a random day at a fraud-typical hour
    start_hour = rng.choice(24, size=len(victims), p=_FRAUD_HOURS / _FRAUD_HOURS.sum())
    start = (
        rng.integers(1, days, len(victims)) * 86_400
        + start_hour * 3_600
        + rng.integers(0, 3_600, len(victims))
    )
    style = rng.choice(3, size=len(victims), p=[0.55, 0.25, 0.20])  # cnp, cloned, stealth
    gap_scale = np.exp(rng.normal(np.log(600.0), 0.9, len(victims)))  # mean seconds between
    burst_country = np.array(_RISKY)[rng.integers(0, len(_RISKY), len(victims))]

    card = np.repeat(victims, burst)
    b = np.repeat(np.arange(len(victims)), burst)
    first = np.r_[True, b[1:] != b[:-1]]
    gaps = np.where(first, 0.0, rng.exponential(1.0, len(b)) * gap_scale[b])
    gaps = np.maximum(gaps, np.where(first, 0.0, 20.0))
    csum = np.cumsum(gaps)
    offset = csum - np.repeat(csum[first], burst)
    secs = start[b] + offset.astype(np.int64)
    st = style[b]

    # isolated frauds: one transaction each, on random cards, mostly card-not-present
    n_iso = rng.binomial(n_legit, ISOLATED_FRAUD_RATE)
    iso_card = rng.integers(0, n_cards, n_iso)
    iso_secs = rng.integers(0, span, n_iso)
    iso_style = rng.choice(3, size=n_iso, p=[0.5, 0.1, 0.4])
    card = np.r_[card, iso_card]
    secs = np.r_[secs, iso_secs]
    st = np.r_[st, iso_style]
    first = np.r_[first, np.ones(n_iso, dtype=bool)]
    burst_country = np.r_[burst_country[b], np.array(_RISKY)[rng.integers(0, len(_RISKY), n_iso)]]
    n = len(card)

    cnp_cat = np.array(
        [
            CATEGORIES.index(c)
            for c in ("electronics", "online_retail", "gambling", "travel", "entertainment")
        ]
    )
    cloned_cat = np.array(
        [CATEGORIES.index(c) for c in ("cash_withdrawal", "electronics", "clothing", "fuel")]
    )
    cat = np.where(
        st == 0,
        cnp_cat[rng.choice(5, size=n, p=[0.35, 0.30, 0.20, 0.10, 0.05])],
        cloned_cat[rng.choice(4, size=n, p=[0.40, 0.30, 0.15, 0.15])],
    )
    stealth = st == 2
    cat[stealth] = _choice_rows(rng, prof["cat_pref"][card[stealth]])
    channel = _channels(rng, cat, prof["contactless"][card])
    channel[st == 0] = CHANNELS.index("online")

    home = prof["home"][card]
    country = home.copy()
    cnp_abroad = (st == 0) & (rng.random(n) < 0.5)
    country[cnp_abroad] = burst_country[cnp_abroad]
    country[st == 1] = burst_country[st == 1]

    lift = np.where(stealth, rng.normal(0.6, 0.4, n), rng.normal(1.3, 0.6, n))
    log_amount = (
        prof["log_mu"][card]
        + _CAT_LOG_OFFSET[cat]
        + lift
        + prof["log_sigma"][card] * rng.standard_normal(n)
    )
    amount = _amounts(rng, log_amount, cat)
    # card testing: a burst often opens with a tiny online charge
    testing = first & ~stealth & (rng.random(n) < 0.35)
    amount[testing] = np.round(rng.uniform(1.0, 5.0, testing.sum()), 2)
    cat[testing] = CATEGORIES.index("online_retail")
    channel[testing] = CHANNELS.index("online")
    return {
        "card": card,
        "secs": secs.astype(np.int64),
        "cat": cat,
        "channel": channel,
        "amount": amount,
        "country": country,
        "is_fraud": np.ones(n, dtype=np.int8),
    }


def _new_tactic(
    rng: np.random.Generator, prof: dict[str, Array], days: int, n: int, since: float
) -> dict[str, Array]:
    """A fraud tactic the models never saw: a night-time "account takeover" wave.

    Domestic (never cross-border, so the card's home country), card-not-present electronics
    and gambling, between 01:00 and 04:59, amounts around 400 (log-normal): every card may be
    hit, from ``since`` (a fraction of the window) on.
    """
    n_cards = len(prof["home"])
    card = rng.integers(0, n_cards, n)
    first_day = int(days * since)
    day = rng.integers(first_day, days, n)
    hour = rng.integers(1, 5, n)
    secs = day * 86_400 + hour * 3_600 + rng.integers(0, 3_600, n)
    cat = np.where(
        rng.random(n) < 0.7, CATEGORIES.index("electronics"), CATEGORIES.index("gambling")
    )
    amount = np.maximum(np.round(np.exp(rng.normal(np.log(400.0), 0.35, n)), 2), 1.0)
    return {
        "card": card,
        "secs": secs.astype(np.int64),
        "cat": cat,
        "channel": np.full(n, CHANNELS.index("online")),
        "amount": amount,
        "country": prof["home"][card].copy(),
        "is_fraud": np.ones(n, dtype=np.int8),
    }


def generate(
    seed: int = DEFAULT_SEED,
    n_cards: int = DEFAULT_CARDS,
    days: int = DEFAULT_DAYS,
    *,
    shift: float = 0.0,
    shift_since: float = 0.5,
) -> pd.DataFrame:
    """Return the transactions of ``n_cards`` cards over the ``days`` days that end at END.

    ``shift`` > 0 adds a new fraud tactic (:func:`_new_tactic`): ``shift`` new-tactic
    transactions per legitimate one, from ``shift_since`` of the window on. Everything else is
    the same world, transaction for transaction (the tactic draws from its own seeded
    generator), so ``shift=0`` writes exactly the original data.
    """
    rng = np.random.default_rng(seed)
    prof = _profiles(rng, n_cards, days)
    legit = _legit(rng, prof, days)
    fraud = _fraud(rng, prof, days, len(legit["card"]))
    parts = [legit, fraud]
    if shift > 0:
        # the legit rows after shift_since, times shift: the wave's share of that period
        later = int((legit["secs"] >= days * 86_400 * shift_since).sum())
        tactic_rng = np.random.default_rng([seed, 1])
        parts.append(_new_tactic(tactic_rng, prof, days, int(later * shift), shift_since))
    cols = {k: np.concatenate([p[k] for p in parts]) for k in legit}
    keep = (cols["secs"] >= 0) & (cols["secs"] < days * 86_400)  # bursts may run past the end
    cols = {k: v[keep] for k, v in cols.items()}

    # one transaction per card per second: nudge ties forward (rare) so that "previous
    # transactions" is unambiguous and Feast's point-in-time join sees a strict order
    order = np.lexsort((cols["is_fraud"], cols["secs"], cols["card"]))
    cols = {k: v[order] for k, v in cols.items()}
    card, secs = cols["card"], cols["secs"]
    while True:
        dup = np.flatnonzero((card[1:] == card[:-1]) & (secs[1:] <= secs[:-1])) + 1
        if len(dup) == 0:
            break
        secs[dup] = secs[dup - 1] + 1
    keep = secs < days * 86_400
    cols = {k: v[keep] for k, v in cols.items()}

    start = END - pd.Timedelta(days=days)
    ts = start + pd.to_timedelta(cols["secs"], unit="s")
    home = prof["home"][cols["card"]]
    df = pd.DataFrame(
        {
            "card_id": np.char.add("c_", np.char.zfill(cols["card"].astype(str), 6)),
            "event_timestamp": ts.astype("datetime64[us, UTC]"),
            "amount": cols["amount"],
            "merchant_category": np.array(CATEGORIES)[cols["cat"]],
            "hour": np.asarray(ts.hour, dtype=np.int8),
            "country": cols["country"],
            "cross_border": (cols["country"] != home).astype(np.int8),
            "channel": np.array(CHANNELS)[cols["channel"]],
            "is_fraud": cols["is_fraud"],
        }
    )
    df = df.sort_values(["event_timestamp", "card_id"], kind="stable").reset_index(drop=True)
    width = max(7, len(str(len(df))))
    df.insert(0, "transaction_id", [f"t_{i:0{width}d}" for i in range(len(df))])
    return df


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--cards", type=int, default=DEFAULT_CARDS)
    p.add_argument("--days", type=int, default=DEFAULT_DAYS)
    p.add_argument("--out", type=Path, default=HERE / "data")
    p.add_argument(
        "--shift",
        type=float,
        default=0.0,
        help="new-tactic fraud transactions per legitimate one (0: the original world)",
    )
    a = p.parse_args(argv)
    from features import write_parquet  # this script's folder is on sys.path

    t0 = time.perf_counter()
    df = generate(a.seed, a.cards, a.days, shift=a.shift)
    out = a.out / "transactions.parquet"
    write_parquet(df, out)
    print(
        f"generate: {len(df):,} transactions, {df['card_id'].nunique():,} cards, "
        f"fraud rate {df['is_fraud'].mean():.3%}, {out.stat().st_size / 1e6:.2f} MB -> {out} "
        f"({time.perf_counter() - t0:.1f} s)",
        flush=True,
    )


if __name__ == "__main__":
    main()
