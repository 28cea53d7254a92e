"""AWS for the ec2 backend, one job per module: who we are (identity), what instances cost
(pricing), getting instances up (launch) and cleaning up after kernels that died (gc).
backends/ec2.py puts them together; staging.py moves large values through S3."""
