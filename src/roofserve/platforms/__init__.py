"""Where the same servers run besides LitServe on one machine (Ray Serve), and the manifests that deploy them."""
