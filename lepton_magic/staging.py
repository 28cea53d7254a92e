"""Large inputs and outputs through an S3 bucket instead of the SSH pipe (the ec2 backend).

Inputs are content-addressed (key ``inputs/<sha256>``: an unchanged input is never uploaded
twice) and fetched by the nodes through presigned URLs, so the nodes need no AWS credentials.
Outputs go up through a presigned PUT the kernel made for the run. Objects are encrypted at rest
(SSE-S3). The sha256 of every object travels in the signed frame and is checked on arrival, so
the bucket is a transport, never a source of trust.
"""

from __future__ import annotations

import hashlib
import urllib.request

#: Below this, values ride in the frames themselves.
DEFAULT_THRESHOLD = 8 << 20
URL_SECONDS = 6 * 3600


class Stager:
    def __init__(self, s3, bucket: str, region: str, threshold: int = DEFAULT_THRESHOLD):
        self.s3 = s3
        self.bucket = bucket
        self.region = region
        self.threshold = threshold
        self.uploaded_bytes = 0
        self._ready = False

    def _ensure_bucket(self) -> None:
        if self._ready:
            return
        try:
            self.s3.head_bucket(Bucket=self.bucket)
        except Exception:
            options = {} if self.region == "us-east-1" else {
                "CreateBucketConfiguration": {"LocationConstraint": self.region}}
            self.s3.create_bucket(Bucket=self.bucket, **options)
            self.s3.put_bucket_encryption(Bucket=self.bucket, ServerSideEncryptionConfiguration={
                "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]})
        self._ready = True

    def put_input(self, blob: bytes) -> dict:
        """Upload (unless already there) and return what a node needs to fetch it."""
        self._ensure_bucket()
        digest = hashlib.sha256(blob).hexdigest()
        key = f"inputs/{digest}"
        try:
            self.s3.head_object(Bucket=self.bucket, Key=key)
        except Exception:
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=blob, ServerSideEncryption="AES256")
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
        body = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        if hashlib.sha256(body).hexdigest() != sha256:
            raise ValueError(f"s3://{self.bucket}/{key} does not match the digest the rank sent")
        self.s3.delete_object(Bucket=self.bucket, Key=key)
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
