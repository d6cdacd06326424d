"""Security: users with SCRAM-SHA-256 verifiers, rights as globs on topic and group names,
login throttling, TLS contexts, and the broker-side service the front ends call.

The rule parts (``rights``, ``users``, ``scram``, ``throttle``, ``state``) do no I/O;
``directory`` reads and writes users through the engine's settings, ``service`` is what
the broker runs. The README's "Security" section is the user's view.
"""

from broker.security.directory import DirectoryError, UserDirectory, load_users_file
from broker.security.rights import ALL_RIGHTS, RIGHTS, Grant, Rights, glob_matches
from broker.security.service import NEEDS_LOGIN, BrokerSecurity, is_loopback
from broker.security.state import SecurityState, SessionAccess
from broker.security.throttle import LoginThrottle
from broker.security.users import Token, User, Verifier, check_password, make_verifier

__all__ = [
    "ALL_RIGHTS",
    "BrokerSecurity",
    "DirectoryError",
    "Grant",
    "LoginThrottle",
    "NEEDS_LOGIN",
    "RIGHTS",
    "Rights",
    "SecurityState",
    "SessionAccess",
    "Token",
    "User",
    "UserDirectory",
    "Verifier",
    "check_password",
    "glob_matches",
    "is_loopback",
    "load_users_file",
    "make_verifier",
]
