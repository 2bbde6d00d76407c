"""Profiles: the shipped ones load, errors name the file, key and line, flags override."""

from __future__ import annotations

from pathlib import Path

import pytest

from multisniff import profiles
from multisniff.errors import UsageError
from multisniff.profiles import PACKAGE_PROFILES, Profile, load_profile, parse_duration, parse_size


@pytest.mark.parametrize("name", ["dns", "http", "all-traffic", "chaos-ci"])
def test_shipped_profiles_load(name: str) -> None:
    profile = load_profile(PACKAGE_PROFILES / f"{name}.toml")
    assert profile.description


def test_every_key_is_documented_in_all_traffic() -> None:
    text = (PACKAGE_PROFILES / "all-traffic.toml").read_text()
    for key in Profile.__dataclass_fields__:
        assert f"{key} =" in text, key


def test_values_are_converted() -> None:
    profile = load_profile(PACKAGE_PROFILES / "chaos-ci.toml")
    assert profile.duration == 600.0
    assert profile.max_size == 500 << 20
    assert profile.snaplen == 128
    assert profile.events is True


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mine.toml"
    path.write_text(text)
    return path


def test_unknown_key_names_file_key_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, 'description = "x"\n\n# a comment\n  snaplenn = 3\n')
    with pytest.raises(UsageError) as info:
        load_profile(path)
    assert f"{path}:4: unknown key 'snaplenn'" in str(info.value)
    assert "snaplen" in str(info.value)


def test_a_replaced_key_names_its_successor(tmp_path: Path) -> None:
    path = write(tmp_path, 'filter = "udp"\nbatch_interval = 1.0\n')
    with pytest.raises(UsageError, match=rf"{path}:2: batch_interval was replaced by "
                                         r"flush_delay, the seconds a packet may wait"):
        load_profile(path)


def test_wrong_type_names_file_key_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, 'filter = "port 53"\ncount = true\n')
    with pytest.raises(UsageError, match=rf"{path}:2: count must be an integer, not bool"):
        load_profile(path)


def test_bad_value_names_file_key_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, 'mode = "sideways"\n')
    with pytest.raises(UsageError, match=rf"{path}:1: mode: 'sideways' is not a mode"):
        load_profile(path)
    path = write(tmp_path, 'duration = "soon"\n')
    with pytest.raises(UsageError, match=rf"{path}:1: duration: 'soon' is not a duration"):
        load_profile(path)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "snaplen = \n")
    with pytest.raises(UsageError, match=rf"{path} is not valid TOML"):
        load_profile(path)


def test_search_order_and_unknown_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    user = tmp_path / "xdg" / "multisniff" / "profiles"
    user.mkdir(parents=True)
    (user / "dns.toml").write_text('description = "mine"\n')
    profile, path = profiles.resolve("dns")
    assert profile.description == "mine" and path == user / "dns.toml"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "dns.toml").write_text('description = "here"\n')
    assert profiles.resolve("dns")[0].description == "here"
    with pytest.raises(UsageError, match="No profile named 'nope'; the profiles found are "
                                         "all-traffic, chaos-ci, dns, http"):
        profiles.resolve("nope")
    assert profiles.resolve(str(user / "dns.toml"))[0].description == "mine"


def test_parsers() -> None:
    assert parse_duration("500ms") == 0.5
    assert parse_duration("2m") == 120
    assert parse_duration("7") == 7
    assert parse_size("10k") == 10240
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("123") == 123
    with pytest.raises(ValueError):
        parse_size("lots")


def test_profile_is_frozen() -> None:
    profile = Profile()
    with pytest.raises(AttributeError):
        profile.snaplen = 5  # type: ignore[misc]


def test_an_unknown_key_suggests_the_closest(tmp_path: Path) -> None:
    path = write(tmp_path, 'durration = "5m"\n')
    with pytest.raises(UsageError, match=rf"{path}:1: unknown key 'durration' in profile "
                                         r"mine.toml; did you mean 'duration'\?"):
        load_profile(path)


def test_the_keys_are_the_settings_fields() -> None:
    """One list: every setting of the engine is a profile key, read as its field's type."""
    import dataclasses

    from multisniff.engine.settings import CaptureSettings

    assert set(profiles.KEYS) == {f.name for f in dataclasses.fields(CaptureSettings)} | {
        "description"}
    path_text = 'reorder_window = "500ms"\nmax_size = "2M"\nbuffer_chunks = 8\n'
    profile = profiles.profile_from_mapping(
        {"reorder_window": "500ms", "max_size": "2M", "buffer_chunks": 8},
        path=Path("x.toml"), text=path_text)
    assert profile.reorder_window == 0.5 and profile.max_size == 2 << 20
    assert profile.settings().buffer_chunks == 8
    assert type(profile.settings()) is CaptureSettings
