from twinflow.sim.opcua_server import _PasswordUserManager

CERTIFICATE = b"0\x82 the client's DER certificate"


def test_the_configured_user_over_a_secured_channel_is_let_in() -> None:
    users = _PasswordUserManager("bridge", "s3cret")
    assert users.get_user(None, "bridge", "s3cret", CERTIFICATE) is not None


def test_wrong_or_missing_credentials_are_refused() -> None:
    users = _PasswordUserManager("bridge", "s3cret")
    assert users.get_user(None, "bridge", "wrong", CERTIFICATE) is None
    assert users.get_user(None, "other", "s3cret", CERTIFICATE) is None
    assert users.get_user(None, None, None, CERTIFICATE) is None


def test_the_right_password_over_an_unsecured_channel_is_refused() -> None:
    # asyncua accepts sessions on the None channel it opens for discovery; the
    # channel's missing client certificate gives that away.
    users = _PasswordUserManager("bridge", "s3cret")
    assert users.get_user(None, "bridge", "s3cret", None) is None
