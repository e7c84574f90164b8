"""Route handlers: thin — decode, call one service, encode."""
