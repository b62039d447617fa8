// Package tlsconf builds the client TLS configuration gwagent uses for DPS
// and IoT Hub: TLS 1.2 or newer, the server always verified against a trust
// bundle, and optionally a client certificate whose private key stays in its
// key store (any crypto.Signer). A leaf utility for provisioning and
// transport.
package tlsconf

import (
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"reflect"
)

// Client returns a TLS client config for server (a host or host:port) that
// trusts only roots. With a signer, chain (leaf first, intermediates after;
// the root may be included and is sent too, as Azure asks for the full chain)
// is presented as the client certificate.
func Client(server string, roots *x509.CertPool, signer crypto.Signer, chain []*x509.Certificate) (*tls.Config, error) {
	if roots == nil {
		return nil, errors.New("tls: no trust bundle; set trust_bundle to the CA file that signs the server's certificate")
	}
	host := server
	if h, _, err := net.SplitHostPort(server); err == nil {
		host = h
	}
	cfg := &tls.Config{
		MinVersion: tls.VersionTLS12,
		RootCAs:    roots,
		ServerName: host,
		// Azure requires the client key's curve in supported_groups; P-384
		// keys need P-384 offered (azure-protocol §5.1).
		CurvePreferences: []tls.CurveID{tls.X25519, tls.CurveP256, tls.CurveP384},
		// TLS 1.2 suites IoT Hub and DPS accept; TLS 1.3 suites are fixed.
		CipherSuites: []uint16{
			tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
			tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
		},
	}
	if signer != nil {
		if len(chain) == 0 {
			return nil, errors.New("tls: client key without a certificate chain")
		}
		cert := tls.Certificate{
			PrivateKey: signer,
			Leaf:       chain[0],
			// Keys in TPMs and tokens sign SHA-384 and SHA-256 digests; keep
			// the handshake to those.
			SupportedSignatureAlgorithms: []tls.SignatureScheme{tls.ECDSAWithP384AndSHA384, tls.ECDSAWithP256AndSHA256},
		}
		for _, c := range chain {
			cert.Certificate = append(cert.Certificate, c.Raw)
		}
		// Always present the chain, whatever the server asks for. With a
		// static Certificates list, crypto/tls sends no certificate at all
		// when the CertificateRequest's certificate_authorities list does
		// not name one of the chain's issuers (Azure may send a list of its
		// own CAs), and the device then fails authentication with no hint
		// why. The server judges the chain, not the client.
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }
	}
	return cfg, nil
}

// RejectedIdentity reports whether err is a server refusing the client's
// certificate inside the TLS handshake: a fatal alert about the certificate
// (bad_certificate, unsupported_certificate, certificate_revoked,
// certificate_expired, certificate_unknown, unknown_ca, access_denied,
// certificate_required) instead of an MQTT CONNACK refusal. Azure may close
// a connection this way. Network failures and alerts about the protocol
// (handshake_failure, protocol_version) are not rejections. A single one may
// come from a middlebox; callers act on repeats.
func RejectedIdentity(err error) bool {
	code, ok := alertCode(err)
	if !ok {
		return false
	}
	switch code {
	case 42, 43, 44, 45, 46, 48, 49, 116:
		return true
	}
	return false
}

// alertCode digs the TLS alert out of err. crypto/tls reports an alert the
// peer sent as a net.OpError "remote error" around an unexported uint8 type
// (AlertError only on QUIC), so the number is read by kind.
func alertCode(err error) (uint8, bool) {
	var ae tls.AlertError
	if errors.As(err, &ae) {
		return uint8(ae), true
	}
	var oe *net.OpError
	for e := err; errors.As(e, &oe); e = oe.Err {
		if oe.Op == "remote error" && oe.Err != nil {
			if v := reflect.ValueOf(oe.Err); v.Kind() == reflect.Uint8 {
				return uint8(v.Uint()), true
			}
		}
		if oe.Err == nil {
			break
		}
	}
	return 0, false
}

// LoadPool reads a PEM trust bundle.
func LoadPool(path string) (*x509.CertPool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("trust bundle: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("trust bundle %s holds no PEM certificate", path)
	}
	return pool, nil
}

// LoadChain reads PEM certificates, in file order.
func LoadChain(path string) ([]*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var out []*x509.Certificate
	for rest := b; ; {
		var blk *pem.Block
		if blk, rest = pem.Decode(rest); blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s holds no PEM certificate", path)
	}
	return out, nil
}
