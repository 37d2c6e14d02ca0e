"""The classifier for special categories of personal data: valid and invalid samples."""

from __future__ import annotations

import pytest

from gateway.policy.classify import Classifier, bsn_valid, card_valid, iban_valid, luhn_valid

HEALTH = ("diagnose", "medisch dossier", "sick leave")


@pytest.mark.parametrize(
    ("number", "valid"),
    [
        ("111222333", True),  # 9*1+8*1+7*1+6*2+5*2+4*2+3*3+2*3-3 = 66 = 6*11
        ("123456782", True),
        ("1112.22.333", True),
        ("111222334", False),  # last digit off by one
        ("123456789", False),
        ("000000000", False),  # passes the sum, but is no number anyone has
        ("11122233", False),  # 8 digits
        ("1112223330", False),  # 10 digits
    ],
)
def test_bsn_eleven_check(number, valid):
    assert bsn_valid(number) is valid


@pytest.mark.parametrize(
    ("iban", "valid"),
    [
        ("NL91ABNA0417164300", True),
        ("NL91 ABNA 0417 1643 00", True),
        ("DE89370400440532013000", True),
        ("GB82WEST12345698765432", True),
        ("BE68539007547034", True),
        ("NL91ABNA0417164301", False),  # check digits do not match
        ("NL91ABNA041716430", False),  # one character short for NL
        ("XX91ABNA0417164300", False),  # no such country
        ("DE89370400440532013001", False),
    ],
)
def test_iban_mod97(iban, valid):
    assert iban_valid(iban) is valid


@pytest.mark.parametrize(
    ("card", "valid"),
    [
        ("4111111111111111", True),  # Visa test number
        ("4111 1111 1111 1111", True),
        ("5500-0000-0000-0004", True),  # Mastercard
        ("378282246310005", True),  # Amex, 15 digits
        ("4111111111111112", False),  # Luhn fails
        ("1234567812345670", False),  # Luhn holds, but no card network starts with 1
        ("411111111111", False),  # 12 digits
    ],
)
def test_card_luhn_and_prefix(card, valid):
    assert card_valid(card) is valid


def test_luhn():
    assert luhn_valid("79927398713")
    assert not luhn_valid("79927398710")


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("Mijn BSN is 111222333, groet", ["bsn"]),
        ("burgerservicenummer: 1234.56.782", ["bsn"]),
        ("Ons kenmerk 1112.22.333", ["bsn"]),  # the 4-2-3 grouping speaks for itself
        ("Order 111222333 shipped", []),  # bare 9 digits: no context, no finding
        ("BSN: 111222334", []),  # context, but the 11-check fails
        ("IBAN NL91 ABNA 0417 1643 00 graag", ["iban"]),
        ("pay to nl91abna0417164300", ["iban"]),
        ("ref NL91ABNA0417164301", []),
        ("card 4111 1111 1111 1111 exp 12/29", ["card"]),
        ("tracking 4111 1111 1111 1112", []),
        ("call +31 6 1234 5678", []),
        ("De diagnose volgt morgen", ["health"]),
        ("Zie het MEDISCH DOSSIER", ["health"]),
        ("on sick leave until May", ["health"]),
        ("a diagnosed bug", []),  # whole words only
        ("BSN 111222333, card 4111111111111111, diagnose", ["bsn", "card", "health"]),
    ],
)
def test_findings(text, found):
    assert Classifier(health_keywords=HEALTH).findings([text]) == found


def test_bare_bsn_counts_when_context_is_not_required():
    classifier = Classifier(health_keywords=HEALTH, bsn_needs_context=False)
    assert classifier.findings(["Order 111222333 shipped"]) == ["bsn"]
    assert classifier.findings(["Order 111222334 shipped"]) == []


def test_only_enabled_categories_are_reported():
    classifier = Classifier(categories=frozenset({"iban"}), health_keywords=HEALTH)
    assert classifier.findings(["BSN 111222333 NL91ABNA0417164300 diagnose"]) == ["iban"]
