package softkey

// The two DER encodings of a P-384 private key the store reads (PKCS #8 and
// SEC 1) and the one it writes (PKCS #8). crypto/x509 has parsers for both,
// but its PKCS #8 parser also parses RSA, Ed25519 and X25519 keys and so
// links their key code into the agent, about 70 KiB of the stripped arm64
// binary, for files that only ever hold P-384 keys. These take the few
// fields a P-384 key has and leave the arithmetic to crypto/ecdsa. They read
// every P-384 key crypto/x509 reads (bytes after the DER key included, which
// it ignores), so no key file that loaded before stops loading; they refuse
// one whose public key is not its private key's, which it does not check.

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"fmt"

	"github.com/gwagent/gwagent/keystore"
)

var (
	oidECPublicKey = asn1.ObjectIdentifier{1, 2, 840, 10045, 2, 1} // RFC 5480
	oidP384        = asn1.ObjectIdentifier{1, 3, 132, 0, 34}       // secp384r1
)

// privateKeyInfo is PKCS #8's PrivateKeyInfo (RFC 5208). Attributes after
// the key, if any, are ignored, as crypto/x509 ignores them.
type privateKeyInfo struct {
	Version    int
	Algorithm  pkix.AlgorithmIdentifier
	PrivateKey []byte
}

// ecPrivateKey is SEC 1's ECPrivateKey (RFC 5915).
type ecPrivateKey struct {
	Version       int
	PrivateKey    []byte
	NamedCurveOID asn1.ObjectIdentifier `asn1:"optional,explicit,tag:0"`
	PublicKey     asn1.BitString        `asn1:"optional,explicit,tag:1"`
}

// marshalPKCS8 encodes k as PKCS #8 with the curve named in both the
// algorithm and the inner key (RFC 5915 asks for the latter), the form
// OpenSSL and crypto/x509 read.
func marshalPKCS8(k *ecdsa.PrivateKey) ([]byte, error) {
	inner, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		return nil, err
	}
	curve, err := asn1.Marshal(oidP384)
	if err != nil {
		return nil, err
	}
	return asn1.Marshal(privateKeyInfo{
		Algorithm:  pkix.AlgorithmIdentifier{Algorithm: oidECPublicKey, Parameters: asn1.RawValue{FullBytes: curve}},
		PrivateKey: inner,
	})
}

// parsePKCS8 decodes a PKCS #8 PrivateKeyInfo holding a P-384 key.
func parsePKCS8(der []byte) (*ecdsa.PrivateKey, error) {
	var info privateKeyInfo
	if _, err := asn1.Unmarshal(der, &info); err != nil {
		return nil, fmt.Errorf("not a PKCS #8 private key: %w", err)
	}
	if !info.Algorithm.Algorithm.Equal(oidECPublicKey) {
		return nil, fmt.Errorf("%w: the key's algorithm is %v, not an elliptic curve; gwagent keys are ECDSA P-384",
			keystore.ErrUnsupportedCurve, info.Algorithm.Algorithm)
	}
	var curve asn1.ObjectIdentifier
	if _, err := asn1.Unmarshal(info.Algorithm.Parameters.FullBytes, &curve); err != nil {
		curve = nil // then the inner key must name it (crypto/x509 reads such keys)
	}
	return parseSEC1(info.PrivateKey, curve)
}

// parseSEC1 decodes an ECPrivateKey. curve is the curve named outside it
// (PKCS #8's algorithm), nil for a bare SEC 1 key, which must name its own;
// when both name one, the outer one counts, as in crypto/x509.
func parseSEC1(der []byte, curve asn1.ObjectIdentifier) (*ecdsa.PrivateKey, error) {
	var k ecPrivateKey
	if _, err := asn1.Unmarshal(der, &k); err != nil {
		return nil, fmt.Errorf("not an EC private key: %w", err)
	}
	if k.Version != 1 {
		return nil, fmt.Errorf("not an EC private key: version %d, want 1", k.Version)
	}
	if curve == nil {
		curve = k.NamedCurveOID
	}
	if !curve.Equal(oidP384) {
		return nil, fmt.Errorf("%w: the key's curve is %v, not P-384 (%v)", keystore.ErrUnsupportedCurve, curve, oidP384)
	}
	// Some encoders drop the scalar's leading zero bytes, and some add one:
	// the fixed-length form crypto/ecdsa takes is 48 bytes.
	const size = 48
	d := bytes.TrimLeft(k.PrivateKey, "\x00")
	if len(d) > size {
		return nil, fmt.Errorf("the private scalar is %d bytes, longer than P-384's %d", len(d), size)
	}
	raw := make([]byte, size)
	copy(raw[size-len(d):], d)
	key, err := ecdsa.ParseRawPrivateKey(elliptic.P384(), raw)
	clear(raw)
	if err != nil {
		return nil, err
	}
	if len(k.PublicKey.Bytes) > 0 {
		pub, err := key.PublicKey.Bytes()
		if err != nil || !bytes.Equal(pub, k.PublicKey.Bytes) {
			return nil, errors.New("the public key in the file does not belong to its private key; the file is damaged")
		}
	}
	return key, nil
}
