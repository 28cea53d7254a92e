"""What an instance costs per hour: the AWS Price List for the region when it answers within a
few seconds, else a built-in us-east-1 list price, labelled as an estimate. Spot prices come
from the region's spot price history (the current price, not an estimate)."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass

log = logging.getLogger("lepton_magic.aws")

#: On-demand Linux list prices, us-east-1, $/h: the fallback when the Price List is out of reach.
US_EAST_1 = {
    "g4dn.xlarge": 0.526, "g4dn.2xlarge": 0.752, "g4dn.4xlarge": 1.204, "g4dn.12xlarge": 3.912,
    "g5.xlarge": 1.006, "g5.2xlarge": 1.212, "g5.4xlarge": 1.624, "g5.12xlarge": 5.672,
    "g5.48xlarge": 16.288, "g6.xlarge": 0.805, "g6.2xlarge": 0.978, "g6.12xlarge": 4.602,
    "g6e.xlarge": 1.861, "g6e.12xlarge": 10.493, "p3.2xlarge": 3.06, "p4d.24xlarge": 32.773,
    "p5.48xlarge": 98.32,
}
#: The Price List API lives in a few regions only; us-east-1 answers for every region.
PRICING_REGION = "us-east-1"
TIMEOUT_SECONDS = 3


@dataclass(frozen=True)
class Price:
    dollars_per_hour: float | None
    #: Where the figure comes from, as shown beside it: "" for a figure from AWS for this
    #: region, else why it may be off (e.g. "estimate: us-east-1 list price").
    note: str = ""

    @property
    def estimate(self) -> bool:
        return bool(self.note)


class Prices:
    """One per backend: asks AWS once per instance type, remembers the answer."""

    def __init__(self, boto3_session, region: str, endpoint: str | None, spot: bool, ec2):
        self.session = boto3_session
        self.region = region
        self.endpoint = endpoint
        self.spot = spot
        self.ec2 = ec2
        self._known: dict[str, Price] = {}
        self._lock = threading.Lock()

    def of(self, instance_type: str) -> Price:
        with self._lock:
            if instance_type not in self._known:
                self._known[instance_type] = self._look_up(instance_type)
            return self._known[instance_type]

    def _look_up(self, instance_type: str) -> Price:
        if self.spot:
            history = self.ec2.describe_spot_price_history(
                InstanceTypes=[instance_type], ProductDescriptions=["Linux/UNIX"], MaxResults=1
            ).get("SpotPriceHistory") or []
            if history:
                return Price(float(history[0]["SpotPrice"]))
        listed = self._price_list(instance_type)
        if listed is not None:
            return Price(listed)
        fallback = US_EAST_1.get(instance_type)
        if fallback is None:
            return Price(None, "price unknown")
        where = "us-east-1 list price" if self.region == "us-east-1" else f"us-east-1 list price, not {self.region}'s"
        return Price(fallback, f"estimate: {where}" + (", on-demand (no spot price found)" if self.spot else ""))

    def _price_list(self, instance_type: str) -> float | None:
        """The on-demand Linux price in this region from the AWS Price List; None when it does
        not answer in time (no network, no permission, a test endpoint without it)."""
        from botocore.config import Config

        try:
            client = self.session.client(
                "pricing", region_name=PRICING_REGION, endpoint_url=self.endpoint,
                config=Config(connect_timeout=TIMEOUT_SECONDS, read_timeout=TIMEOUT_SECONDS,
                              retries={"total_max_attempts": 1}))
            products = client.get_products(ServiceCode="AmazonEC2", MaxResults=1, Filters=[
                {"Type": "TERM_MATCH", "Field": field, "Value": value} for field, value in (
                    ("instanceType", instance_type), ("regionCode", self.region),
                    ("operatingSystem", "Linux"), ("tenancy", "Shared"), ("preInstalledSw", "NA"),
                    ("capacitystatus", "Used"))])["PriceList"]
            return on_demand_dollars(json.loads(products[0])) if products else None
        except Exception as e:
            log.info("the AWS Price List did not answer for %s in %s: %s", instance_type, self.region, e)
            return None


def on_demand_dollars(product: dict) -> float | None:
    """The $/h of a Price List product's on-demand term."""
    for term in (product.get("terms") or {}).get("OnDemand", {}).values():
        for dimension in term.get("priceDimensions", {}).values():
            usd = dimension.get("pricePerUnit", {}).get("USD")
            if usd is not None and float(usd) > 0:
                return float(usd)
    return None
