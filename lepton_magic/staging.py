"""Large inputs and outputs through an S3 bucket instead of the SSH pipe (the ec2 backend).

Inputs are content-addressed (key ``inputs/<sha256>``: an unchanged input is never uploaded
twice) and fetched by the nodes through presigned URLs, so the nodes need no AWS credentials.
Outputs go up through a presigned PUT the kernel made for the run. Objects are encrypted at rest
(SSE-S3). The sha256 of every object travels in the signed frame and is checked on arrival, so
the bucket is a transport, never a source of trust.

Every call names the account expected to own the bucket (ExpectedBucketOwner): a bucket of the
same name in someone else's account is refused, never written to. A lifecycle rule expires
inputs after INPUT_DAYS (an unchanged input is uploaded again after that) and leftover outputs
(a run that died before its kernel read them) after a day.
"""

from __future__ import annotations

import hashlib
import urllib.request

from .errors import LeptonError

#: Below this, values ride in the frames themselves.
DEFAULT_THRESHOLD = 8 << 20
URL_SECONDS = 6 * 3600
INPUT_DAYS = 7
LIFECYCLE_RULES = [
    {"ID": "lepton-magic-inputs", "Filter": {"Prefix": "inputs/"}, "Status": "Enabled",
     "Expiration": {"Days": INPUT_DAYS}, "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}},
    {"ID": "lepton-magic-outputs", "Filter": {"Prefix": "outputs/"}, "Status": "Enabled",
     "Expiration": {"Days": 1}, "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}},
]


class Stager:
    def __init__(self, s3, bucket: str, region: str, threshold: int = DEFAULT_THRESHOLD, *, owner: str):
        self.s3 = s3
        self.bucket = bucket
        self.owner = owner  # the account id: every call expects the bucket to be this account's
        self.region = region
        self.threshold = threshold
        self.uploaded_bytes = 0
        self._ready = False

    def _ensure_bucket(self) -> None:
        if self._ready:
            return
        mine = {"Bucket": self.bucket, "ExpectedBucketOwner": self.owner}
        try:
            self.s3.head_bucket(**mine)
        except Exception as e:
            status = getattr(e, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 403:  # it exists, in another account (or ours refuses us): never use it
                raise LeptonError(f"the bucket {self.bucket} is not yours (account {self.owner}) or not readable: "
                                  "name one of yours with %lepton config ec2_s3_bucket=NAME") from None
            options = {} if self.region == "us-east-1" else {
                "CreateBucketConfiguration": {"LocationConstraint": self.region}}
            self.s3.create_bucket(Bucket=self.bucket, **options)
            self.s3.put_bucket_encryption(**mine, ServerSideEncryptionConfiguration={
                "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]})
        self._ensure_lifecycle()
        self._ready = True

    def _ensure_lifecycle(self) -> None:
        """Our expiry rules, beside whatever rules of its own the bucket has."""
        mine = {"Bucket": self.bucket, "ExpectedBucketOwner": self.owner}
        try:
            rules = self.s3.get_bucket_lifecycle_configuration(**mine).get("Rules", [])
        except Exception:  # NoSuchLifecycleConfiguration
            rules = []
        ours = {r["ID"] for r in LIFECYCLE_RULES}
        if [r for r in rules if r.get("ID") in ours] == LIFECYCLE_RULES:
            return
        kept = [r for r in rules if r.get("ID") not in ours]
        self.s3.put_bucket_lifecycle_configuration(**mine, LifecycleConfiguration={"Rules": kept + LIFECYCLE_RULES})

    def put_input(self, blob: bytes) -> dict:
        """Upload (unless already there) and return what a node needs to fetch it."""
        self._ensure_bucket()
        digest = hashlib.sha256(blob).hexdigest()
        key = f"inputs/{digest}"
        try:
            self.s3.head_object(Bucket=self.bucket, Key=key, ExpectedBucketOwner=self.owner)
        except Exception:
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=blob, ServerSideEncryption="AES256",
                               ExpectedBucketOwner=self.owner)
            self.uploaded_bytes += len(blob)
        url = self.s3.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": key},
                                             ExpiresIn=URL_SECONDS)
        return {"url": url, "sha256": digest, "size": len(blob)}

    def output_slot(self, run_id: str) -> dict:
        """A presigned PUT rank 0 may use for large outputs of this run."""
        self._ensure_bucket()
        key = f"outputs/{run_id}"
        url = self.s3.generate_presigned_url(
            "put_object", Params={"Bucket": self.bucket, "Key": key, "ContentType": "application/octet-stream",
                                  "ServerSideEncryption": "AES256"}, ExpiresIn=URL_SECONDS)
        return {"url": url, "key": key, "threshold": self.threshold}

    def get_output(self, key: str, sha256: str) -> bytes:
        body = self.s3.get_object(Bucket=self.bucket, Key=key, ExpectedBucketOwner=self.owner)["Body"].read()
        if hashlib.sha256(body).hexdigest() != sha256:
            raise ValueError(f"s3://{self.bucket}/{key} does not match the digest the rank sent")
        self.s3.delete_object(Bucket=self.bucket, Key=key, ExpectedBucketOwner=self.owner)
        return body


# --- on the node: plain HTTP, no AWS SDK ------------------------------------------------------------
def fetch(ref: dict) -> bytes:
    with urllib.request.urlopen(ref["url"], timeout=600) as response:
        data = response.read()
    if hashlib.sha256(data).hexdigest() != ref["sha256"]:
        raise ValueError("the staged input does not match its digest")
    return data


def upload(slot: dict, body: bytes) -> str:
    request = urllib.request.Request(slot["url"], data=body, method="PUT", headers={
        "Content-Type": "application/octet-stream", "x-amz-server-side-encryption": "AES256"})
    with urllib.request.urlopen(request, timeout=600):
        pass
    return hashlib.sha256(body).hexdigest()
