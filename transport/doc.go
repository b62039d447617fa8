// Package transport is gwagent's MQTT session to Azure IoT Hub: TLS with
// the device's signer and full certificate chain, the documented topics and
// property bags, telemetry with PUBACK, the device twin, direct methods,
// cloud-to-device messages and the certificate-signing API. MQTT only: the
// durable queue that feeds telemetry is the telemetry pipeline's (package
// telemetry), which reaches a Session as its Publisher.
//
// It wraps paho once (subscriptions replayed on every connect, a timeout on
// every token, handlers that never block). It imports nothing of gwagent's
// but small leaf utilities, and never logs: it reports through callbacks.
// Importers: agent.
package transport
