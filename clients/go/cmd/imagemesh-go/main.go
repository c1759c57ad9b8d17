// Command imagemesh-go is a small Go client of imagemesh: it checks each service's health,
// uploads an image through the client-streaming contract (header, then chunks, with the
// SHA-256 the server verifies), and lists a dataset's images.
//
//	imagemesh-go health   ADDRESS
//	imagemesh-go upload   ADDRESS FILE [DATASET [LABEL]]
//	imagemesh-go list     ADDRESS [DATASET]
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	storagev1 "github.com/imagemesh/imagemesh/clients/go/gen/imagemesh/storage/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// chunkSize is the size of each upload message: well under the server's message limit.
const chunkSize = 1 << 20

var services = []string{
	"",
	"imagemesh.storage.v1.StorageService",
	"imagemesh.search.v1.SearchService",
	"imagemesh.inference.v1.InferenceService",
}

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: imagemesh-go health|upload|list ADDRESS [ARGS...]")
		os.Exit(2)
	}
	conn, err := grpc.NewClient(os.Args[2], grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fail(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	switch os.Args[1] {
	case "health":
		err = health(ctx, conn)
	case "upload":
		if len(os.Args) < 4 {
			fail(errors.New("upload needs a FILE"))
		}
		err = upload(ctx, conn, os.Args[3], arg(4), arg(5))
	case "list":
		err = list(ctx, conn, arg(3))
	default:
		fmt.Fprintf(os.Stderr, "unknown command %q\n", os.Args[1])
		os.Exit(2)
	}
	if err != nil {
		fail(err)
	}
}

func arg(i int) string {
	if len(os.Args) > i {
		return os.Args[i]
	}
	return ""
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "imagemesh-go:", err)
	os.Exit(1)
}

func health(ctx context.Context, conn *grpc.ClientConn) error {
	client := healthpb.NewHealthClient(conn)
	for _, name := range services {
		reply, err := client.Check(ctx, &healthpb.HealthCheckRequest{Service: name})
		if err != nil {
			return fmt.Errorf("health of %q: %w", name, err)
		}
		label := name
		if label == "" {
			label = "(server)"
		}
		fmt.Printf("%s %s\n", label, reply.GetStatus())
	}
	return nil
}

func upload(ctx context.Context, conn *grpc.ClientConn, path, dataset, label string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	sum := sha256.Sum256(data)
	stream, err := storagev1.NewStorageServiceClient(conn).UploadImage(ctx)
	if err != nil {
		return err
	}
	header := &storagev1.UploadImageHeader{
		Filename:          filepath.Base(path),
		Dataset:           dataset,
		Label:             label,
		ExpectedSha256:    hex.EncodeToString(sum[:]),
		ExpectedSizeBytes: int64(len(data)),
	}
	if err := stream.Send(&storagev1.UploadImageRequest{
		Payload: &storagev1.UploadImageRequest_Header{Header: header},
	}); err != nil {
		return err
	}
	for start := 0; start < len(data); start += chunkSize {
		end := min(start+chunkSize, len(data))
		if err := stream.Send(&storagev1.UploadImageRequest{
			Payload: &storagev1.UploadImageRequest_Chunk{Chunk: data[start:end]},
		}); err != nil && !errors.Is(err, io.EOF) {
			return err
		}
	}
	reply, err := stream.CloseAndRecv()
	if err != nil {
		return err
	}
	image := reply.GetImage()
	fmt.Printf("%s %dx%d duplicate=%t\n", image.GetName(), image.GetWidth(), image.GetHeight(), reply.GetDuplicate())
	return nil
}

func list(ctx context.Context, conn *grpc.ClientConn, dataset string) error {
	client := storagev1.NewStorageServiceClient(conn)
	token := ""
	for {
		page, err := client.ListImages(ctx, &storagev1.ListImagesRequest{Dataset: dataset, PageToken: token, PageSize: 500})
		if err != nil {
			return err
		}
		for _, image := range page.GetImages() {
			fmt.Printf("%s %s %s\n", image.GetName(), image.GetFilename(), image.GetLabel())
		}
		token = page.GetNextPageToken()
		if token == "" {
			return nil
		}
	}
}
