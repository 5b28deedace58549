"""The botocore session's quick data loader: it must know every service
botocore's credential providers build clients for, and refuse none it ships."""

from __future__ import annotations

import botocore.exceptions
import botocore.session
import pytest

from lazyfs import awssession
from lazyfs.awssession import _QuickLoader


def _loader() -> _QuickLoader:
    return _QuickLoader.for_session(botocore.session.get_session())


@pytest.mark.parametrize("service", ["s3", "sts", "sso", "sso-oidc"])
def test_the_loader_knows_the_services_credential_providers_need(service: str) -> None:
    loader = _loader()
    model = loader.load_service_model(service, "service-2")
    assert model["metadata"]["endpointPrefix"]
    # The quick path: no scan of every service folder botocore ships.
    assert len(loader.list_available_services("service-2")) <= 4


def test_any_other_service_botocore_ships_falls_back_to_its_full_check() -> None:
    loader = _loader()
    assert loader.load_service_model("ec2", "service-2")["metadata"]["endpointPrefix"] == "ec2"
    assert len(loader.list_available_services("service-2")) > 100
    assert loader.load_service_model("sts", "service-2")


def test_a_service_botocore_does_not_ship_is_still_refused_by_name() -> None:
    with pytest.raises(botocore.exceptions.UnknownServiceError, match="no-such-service"):
        _loader().load_service_model("no-such-service", "service-2")


def test_a_session_can_build_an_sts_client() -> None:
    core = botocore.session.get_session()
    core.register_component("data_loader", _QuickLoader.for_session(core))
    assert core.create_client("sts", region_name="us-east-1").meta.service_model.service_name == "sts"


def test_a_cause_is_said_on_one_line_without_botocore_s_trailing_colon() -> None:
    e = botocore.exceptions.CredentialRetrievalError(
        provider="container-role", error_msg="Received error when attempting to retrieve container metadata:\n")
    assert awssession.said(e).endswith("container metadata")
    assert "\n" not in awssession.said(e)
