//! The service proxy: Services and EndpointSlices programmed into iptables.
