"""A gateway that logs in to the broker must have a client id no device account can be bound to."""

from __future__ import annotations

import pytest

from ioc.cli import _check_gateway_client_id
from ioc_core.errors import ConfigurationError
from ioc_core.settings import load_settings


def test_a_gateway_logging_in_needs_the_system_prefix() -> None:
    with pytest.raises(ConfigurationError, match="IOC_GATEWAY_CLIENT_ID must begin with 'ioc-'"):
        _check_gateway_client_id(
            load_settings(mqtt_url="mqtt://ioc-gateway:pw@broker:1883", gateway_client_id="gw-1")
        )
    _check_gateway_client_id(
        load_settings(mqtt_url="mqtt://ioc-gateway:pw@broker:1883", gateway_client_id="ioc-gw-1")
    )
    # An anonymous broker binds no device accounts: any id will do.
    _check_gateway_client_id(load_settings(mqtt_url="mqtt://broker:1883", gateway_client_id="gw-1"))
