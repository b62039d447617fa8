// Package pahoref is the plain paho client make bench compares the agent
// with: a device identity (chain, key, the hub's trust bundle) and the
// client options a minimal Azure IoT Hub client would use. The bench's
// drain reference and its memory reference (devtools/bench/memref) share
// it; it imports nothing of gwagent's, so memref's memory is paho's, TLS's
// and Go's.
package pahoref

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
)

// Job is what a reference client publishes, and as whom.
type Job struct {
	Host       string   `json:"host"` // as DPS assigned it: host or host:port
	DeviceID   string   `json:"deviceId"`
	Chain      [][]byte `json:"chain"` // DER, leaf first
	Key        []byte   `json:"key"`   // PKCS#8 DER
	Bundle     string   `json:"bundle"`
	APIVersion string   `json:"apiVersion"`
	N          int      `json:"n"`
}

// Options are the client's: MQTT 3.1.1 over TLS 1.2+ to the hub, the full
// chain presented, a persistent session, no automatic reconnect.
func (j Job) Options() (*mqtt.ClientOptions, error) {
	key, err := x509.ParsePKCS8PrivateKey(j.Key)
	if err != nil {
		return nil, err
	}
	pem, err := os.ReadFile(j.Bundle)
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, errors.New("pahoref: no certificates in the trust bundle")
	}
	cert := tls.Certificate{PrivateKey: key, Certificate: j.Chain}
	host, hostname := j.Host, j.Host
	if i := strings.LastIndexByte(host, ':'); i > 0 {
		hostname = host[:i]
	} else {
		host += ":8883"
	}
	return mqtt.NewClientOptions().AddBroker("tls://" + host).SetClientID(j.DeviceID).
		SetUsername(hostname + "/" + j.DeviceID + "/?api-version=" + j.APIVersion).
		SetTLSConfig(&tls.Config{MinVersion: tls.VersionTLS12, RootCAs: roots, ServerName: hostname,
			// Always present the chain, as a client of Azure must: the hub's
			// CA list need not name the device's issuer (azsim's hard mode).
			GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }}).
		SetProtocolVersion(4).SetCleanSession(false).SetAutoReconnect(false).SetWriteTimeout(time.Minute), nil
}

// Connect connects a client with Options and waits up to 30 s for the
// CONNACK.
func (j Job) Connect() (mqtt.Client, error) {
	opts, err := j.Options()
	if err != nil {
		return nil, err
	}
	c := mqtt.NewClient(opts)
	if tok := c.Connect(); !tok.WaitTimeout(30*time.Second) || tok.Error() != nil {
		return nil, fmt.Errorf("connect: %v", tok.Error())
	}
	return c, nil
}

// Topic is the telemetry topic of message i, with the system properties
// the agent sends too.
func (j Job) Topic(i int) string {
	return "devices/" + j.DeviceID + "/messages/events/%24.mid=ref-" + strconv.Itoa(i) + "&%24.ct=application%2Fjson&%24.ce=utf-8"
}
